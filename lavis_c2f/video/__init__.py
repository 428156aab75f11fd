"""From video files to features: probing (:mod:`.probe`) and decoding (:mod:`.decode`), frame-index
sampling for end-to-end retrievers (:mod:`.frame_sampling`), frame/query encoders registered as
``c2f_feature_*`` LAVIS models (:mod:`.backbones`: the interface in :mod:`.backbone_base`, the frame
encoders in :mod:`.frame_backbones`, SlowFast in :mod:`.slowfast`), speech captions
(:mod:`.captions`), one encoded video (:mod:`.encoded`), corpus extraction (:mod:`.extract`;
building an index of the features is :mod:`lavis_c2f.index.build`'s), and the
``lavis-c2f extract`` command with the video options every command shares (:mod:`.cli`).

Importing this package is light; ``import lavis_c2f.video.backbones`` registers the encoders.
"""

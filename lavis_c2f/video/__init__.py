"""From video files to features: probing/decoding (:mod:`.decode`), frame-index sampling for
end-to-end retrievers (:mod:`.frame_sampling`), frame/query encoders
registered as ``c2f_feature_*`` LAVIS models (:mod:`.backbones`), speech captions
(:mod:`.captions`), corpus extraction and video indexing (:mod:`.extract`), and the
``lavis-c2f extract`` / ``lavis-c2f index videos`` commands (:mod:`.cli`).

Importing this package is light; ``import lavis_c2f.video.backbones`` registers the encoders.
"""

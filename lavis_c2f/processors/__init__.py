"""Registered components (imported by lavis_c2f/__init__.py).

Importing this package registers the ``c2f_video_features``, ``c2f_text_features``,
``c2f_clip_frames`` and ``c2f_clip_tokenizer`` processors with LAVIS.
"""
from lavis_c2f.processors import clip_processors  # noqa: F401  (registration)
from lavis_c2f.processors import feature_processors  # noqa: F401  (registration)
from lavis_c2f.processors.feature_processors import TextFeatureProcessor, VideoFeatureProcessor  # noqa: F401

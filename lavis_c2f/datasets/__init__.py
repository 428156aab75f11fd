"""Registered components (imported by lavis_c2f/__init__.py).

Importing this package registers the dataset builders ``c2f_qvh``, ``c2f_charades_sta``,
``c2f_tacos``, ``c2f_demo`` (features) and ``c2f_msrvtt`` (video files) with LAVIS.
"""
from lavis_c2f.datasets import builders  # noqa: F401  (registration)
from lavis_c2f.datasets import frames_builders  # noqa: F401  (registration)
from lavis_c2f.datasets.moment_retrieval import MomentRetrievalDataset, collate_moment_retrieval  # noqa: F401
from lavis_c2f.datasets.video_retrieval import VideoRetrievalDataset, collate_video_retrieval  # noqa: F401
from lavis_c2f.datasets.video_frames import VideoFramesRetrievalDataset  # noqa: F401

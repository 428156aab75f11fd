"""Annotation readers, feature stores and the embedded demo corpus.

Modules (import what you need; nothing is imported here):

* :mod:`lavis_c2f.data.records` -- ``MomentRecord``, the one annotation record.
* :mod:`lavis_c2f.data.readers` -- QVHighlights / Charades-STA / TACoS readers with validation
  (``read_annotations``, ``write_qvh_jsonl``).
* :mod:`lavis_c2f.data.msrvtt` -- MSR-VTT annotation files (``MSRVTT_data.json``, the 9k / 7k
  training csv, the 1k-A JSFusion test csv).
* :mod:`lavis_c2f.data.features` -- feature stores (npz folder, HDF5, webdataset shards),
  ``open_store``, ``convert_store`` and the QD-DETR-exact ``VideoFeatureLoader`` /
  ``TextFeatureLoader``.
* :mod:`lavis_c2f.data.demo_corpus` -- the seeded synthetic corpus (``make_demo_corpus``).
* :mod:`lavis_c2f.data.cli` -- ``lavis-c2f make-demo-corpus`` and ``lavis-c2f convert``.
"""

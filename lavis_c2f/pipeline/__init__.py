"""The coarse-to-fine pipeline around the stage-1 and stage-2 tasks.

* :mod:`.engine`: the coarse-to-fine loop (a batch of queries -> stage-1 top-K -> grounding ->
  fusion -> optional stage 3) that the corpus task, the predictor, ``lavis-c2f search`` and the
  web demo all run; :mod:`.stages`: its stage backends (trained or zero-shot, long videos in
  chunks); :mod:`.results`: what a search returns.
* :mod:`.merge`: stage-1 ranks + annotations -> stage-2 annotations (``lavis-c2f merge-stage1``).
* :mod:`.hard_negatives`: stage-2 training samples pairing a query with a retrieved non-GT video.
* :mod:`.fusion`: stage-1 x stage-2 score fusion, VCMR / oracle / single-video metrics, and the
  weight search of ``lavis-c2f tune-fusion``.
* :mod:`.refine`: the ``run.refine`` switch of the corpus task (stage 3 on the best fused videos;
  imports the refiner only when on).
* :mod:`.quickstart`: the whole chain on the embedded demo corpus (``lavis-c2f quickstart``);
  :mod:`.quickstart_run`: the layout of its run directory, read and written there only.
* :mod:`.expected`: the figures ``bench/reproducibility.py`` measured for the demo jobs (the
  quickstart prints their range; the README shows them).
* :mod:`.cli`: the sub-commands.

:mod:`.quickstart` and :mod:`.cli` are commands (they run the LAVIS entry points of
:mod:`lavis_c2f.launch`); the other modules sit below the tasks and the predictor.
"""

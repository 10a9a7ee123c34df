"""Scene inference: windows of the pair -> FSG-Net in batches -> blended strips -> rasters, polygons, run.json.

Data flows one way through stages, one module each: :mod:`~cdmap.predict.options` (what the caller chose),
:mod:`~cdmap.predict.plan` (resolved once against the checkpoint), :mod:`~cdmap.predict.compute` (windows
through the network into journaled row strips, :mod:`~cdmap.predict.journal`, so ``resume=True`` continues
an interrupted run), :mod:`~cdmap.predict.assemble` (rasters and polygons from the strips) and
:mod:`~cdmap.predict.outputs` (names, checks, run.json, everything renamed into place at once).
:mod:`~cdmap.predict.scene` runs one pair through them (``predict_scene``; under torchrun each rank computes
the share of the strips that :mod:`~cdmap.predict.ranks` gives it) and :mod:`~cdmap.predict.pairs` runs
campaigns of pairs (``predict_pairs``, ``index.gpkg``).
"""

from __future__ import annotations

from cdmap.predict.assemble import change_mask
from cdmap.predict.options import PredictOptions, RunOptions
from cdmap.predict.outputs import (
    MASK_NAME,
    MASK_NODATA,
    PROB_NAME,
    RUN_NAME,
    VECTOR_FORMATS,
    VECTOR_NAME,
    PredictResult,
    output_paths,
)
from cdmap.predict.pairs import CampaignResult, PairOutcome, predict_pairs, read_pairs
from cdmap.predict.plan import PredictPlan, default_overlap
from cdmap.predict.scene import predict_one, predict_scene

__all__ = ["predict_scene", "predict_one", "predict_pairs", "read_pairs", "CampaignResult", "PairOutcome",
           "PredictOptions", "RunOptions", "PredictResult", "PredictPlan", "default_overlap", "output_paths",
           "change_mask", "PROB_NAME", "MASK_NAME", "RUN_NAME", "VECTOR_NAME", "VECTOR_FORMATS", "MASK_NODATA"]

"""Triton Python model ``echo_encoder`` (written by ``echoembed triton --encoder python``).

``input_ids``, ``attention_mask``, ``pool_mask`` (INT64 [batch, seq], right-padded; the inputs
allow ragged batches) -> ``embedding`` (FP32 [batch, hidden], L2-normalized). Every request of a
dynamic batch is padded into ONE ONNX Runtime batch through ``echoembed.runtime``; a request with
unusable inputs gets its own INVALID_ARG error and the others are served.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from echoembed.deploy.models import EncoderModel, model_artifact_dir, model_parameters
from echoembed.echo import INPUT_NAMES
from echoembed.errors import UserError


def _error(message: str, code) -> object:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = model_parameters(json.loads(args["model_config"]))
        threads = int(params["threads"]) if params.get("threads") else None
        self.model = EncoderModel(model_artifact_dir(args), threads=threads)

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        good, rows = [], []
        for i, request in enumerate(requests):
            try:
                arrays = [pb_utils.get_input_tensor_by_name(request, n) for n in INPUT_NAMES]
                rows.append(self.model.rows(*(a.as_numpy() for a in arrays)))
                good.append(i)
            except UserError as e:
                responses[i] = _error(str(e), pb_utils.TritonError.INVALID_ARG)
        if good:
            try:
                embeddings = self.model.embed(rows)
            except Exception as e:  # the whole ORT batch failed: every request in it says why
                message = f"echo_encoder: {type(e).__name__}: {e}"
                for i in good:
                    responses[i] = _error(message, pb_utils.TritonError.INTERNAL)
            else:
                for i, emb in zip(good, embeddings, strict=True):
                    out = pb_utils.Tensor("embedding", emb)
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
        return responses

"""Triton Python model ``echo_tokenizer`` (written by ``echoembed triton`` as ``1/model.py``).

``text`` (BYTES [batch, 1]) and an optional ``template`` (BYTES [batch, 1]: a name the artifact
knows, or empty for its default) -> ``input_ids``, ``attention_mask``, ``pool_mask`` (INT64
[batch, seq], right-padded), encoded by ``echoembed.echo`` exactly as ``Embedder.encode`` does.
With the ``strip_prefix`` parameter ``"true"`` (a prefix-reuse artifact served by a graph encoder,
``onnxruntime`` or ``tensorrt``) the outputs are the prompts without the prefix baked into the
graph (``echo.strip_prefix`` with the manifest's ``prefix_ids``), as that graph takes them.
A request the caller can fix gets its own INVALID_ARG error; the rest of its batch is served.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

import echoembed
from echoembed.deploy.models import TextLimits, TextModel, model_artifact_dir, model_parameters
from echoembed.echo import strip_prefix
from echoembed.errors import UserError


def _error(message: str, code) -> object:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = model_parameters(json.loads(args["model_config"]))
        version = params.get("echoembed_version")
        if version and version != echoembed.__version__:
            pb_utils.Logger.log_warn(
                f"echo_tokenizer was written by echoembed {version} but this server runs "
                f"{echoembed.__version__}; rewrite the repository with `echoembed triton`"
            )
        limits = TextLimits(
            max_text_bytes=int(params.get("max_text_bytes", TextLimits.max_text_bytes)),
            custom_templates=params.get("custom_templates", "false") == "true",
        )
        self.model = TextModel(model_artifact_dir(args), limits)
        # the ids echo_encoder's graph does not take (() when it takes whole prompts)
        strip = params.get("strip_prefix", "false") == "true"
        self.prefix_ids = self.model.manifest.prefix_ids if strip else ()

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
                tpl = pb_utils.get_input_tensor_by_name(request, "template")
                batch = self.model.encode(text, None if tpl is None else tpl.as_numpy())
                batch = strip_prefix(batch, self.prefix_ids)
                outputs = [pb_utils.Tensor(k, v) for k, v in batch.feed().items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except UserError as e:
                responses.append(_error(str(e), pb_utils.TritonError.INVALID_ARG))
            except Exception as e:  # a bug: fail this request only, and say so
                responses.append(
                    _error(
                        f"echo_tokenizer: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL
                    )
                )
        return responses

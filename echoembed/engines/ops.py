"""The ONNX operators TensorRT's ONNX parser (onnx-tensorrt) imports, as data.

Source: onnx-tensorrt ``docs/operators.md``, https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md
- TensorRT 10.15 (the newest documented): "supports operators in the inclusive range of opset 9 to
  opset 24". Read from the stored copy of that file headed "TensorRT 10.15" (its commit hash was
  not exposed by the index it was read from; the file on ``main`` at the 10.15 release).
- TensorRT 10.0 / 10.1: the same file at tag ``release/10.1-GA`` (commit
  96e781103cfc4adf4a6bb557e94bac8e693f6f4c; its header still says "TensorRT 10.0 supports operators
  in the inclusive range of opset 9 to opset 20"), and ``10.0-GA`` (73f629e04a68) says the same.

``SUPPORTED`` is the 10.15 table's "Y" rows (op, supported types, the restriction where it can
matter to an echoembed graph); ``ADDED_AFTER_10_1`` lists the ops 10.15 supports that 10.1's table
does not (they are unsupported when checking 10.0-10.14). The type columns are 10.15's.

Domains: the parser dispatches on ``op_type`` alone (``ModelImporter.cpp``); a name it has no
importer for is tried as a TensorRT plugin of that name. TensorRT ships no plugin for the
``com.microsoft`` ops echoembed's recipes write (MatMulNBits, GatherBlockQuantized), so every node
outside the default ONNX domain is unsupported unless ``KNOWN_PLUGINS`` names it (empty today).
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE_URL = "https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md"
SOURCE_TAG_10_1 = "release/10.1-GA (96e781103cfc4adf4a6bb557e94bac8e693f6f4c)"
LATEST = "10.15"
# documented TensorRT version -> (min opset, max opset) of the default domain
OPSET_RANGES: dict[str, tuple[int, int]] = {"10.0": (9, 20), "10.1": (9, 20), "10.15": (9, 24)}
DEFAULT_DOMAINS = ("", "ai.onnx")
KNOWN_PLUGINS: dict[tuple[str, str], str] = {}  # (domain, op) -> TensorRT plugin; none known
# ONNX element type name -> TensorRT's name in the table (types TensorRT has at all)
TRT_TYPES: dict[str, str] = {
    "FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "INT32": "INT32", "INT64": "INT64",
    "INT8": "INT8", "UINT8": "UINT8", "BOOL": "BOOL", "INT4": "INT4", "DOUBLE": "DOUBLE",
    "FLOAT8E4M3FN": "FP8", "FLOAT4E2M1": "FP4",
}  # fmt: skip
IO_TYPES = ("FP32", "FP16", "BF16", "INT32", "INT64", "INT8", "UINT8", "BOOL")  # network I/O


@dataclass(frozen=True)
class OpSupport:
    """One supported operator: the data types it imports and its documented restriction."""

    op: str
    types: tuple[str, ...]
    restriction: str = ""


_F = "FP32,FP16,BF16"
_FI = "FP32,FP16,BF16,INT32,INT64"
_FIB = "FP32,FP16,BF16,INT32,INT64,BOOL"
_AXES = "`axes` must be an initializer"
# op | types | restriction (kept where it can matter to an exported LM graph)
_TABLE = f"""
Abs|{_FI}
Acos|{_F}
Acosh|{_F}
Add|{_FI}
And|BOOL
ArgMax|{_FI}
ArgMin|{_FI}
Asin|{_F}
Asinh|{_F}
Atan|{_F}
Atanh|{_F}
Attention|{_F},INT8,FP8|Q, K, V and attn_mask 4-D; no past_key/past_value inputs
AveragePool|{_F}
BatchNormalization|{_F}
BlackmanWindow|FP32,FP16
Cast|{_FI},UINT8,BOOL
CastLike|{_FI},UINT8,BOOL
Ceil|{_F}
Celu|{_F}
Clip|{_F}
Concat|{_FIB}
Constant|{_FIB},FP8,FP4,INT4|`sparse_value`, `value_string(s)` attributes unsupported
ConstantOfShape|{_FIB},FP8,FP4,INT4
Conv|{_F}
ConvTranspose|{_F}
Cos|{_F}
Cosh|{_F}
CumSum|{_F}|`axis` must be a build-time constant
DeformConv|FP32,FP16
DepthToSpace|{_FI}
DequantizeLinear|INT8,FP8,FP4,INT4|`x_zero_point` must be zero
Div|{_FI}
Dropout|{_F}|`is_training` must be an initializer and False
Einsum|{_F}
Elu|{_F}
Equal|{_FI}
Erf|{_F}
Exp|{_F}
Expand|{_FIB}
EyeLike|{_FIB}|`input` must have static dimensions
Flatten|{_FIB}
Floor|{_F}
Gather|{_FIB}
GatherElements|{_FIB}
GatherND|{_FIB}
Gelu|{_FI},INT8
Gemm|{_F}
GlobalAveragePool|{_F}
GlobalLpPool|{_F}
GlobalMaxPool|{_F}
Greater|{_FI}
GreaterOrEqual|{_FI}
GridSample|FP32,FP16
GroupNormalization|{_F}
GRU|{_F}
HammingWindow|FP32,FP16
HannWindow|FP32,FP16
HardSigmoid|{_F}
HardSwish|{_F}
Hardmax|{_F}
Identity|{_FIB}
If|{_FIB}|both branches' outputs must have the same rank
ImageScaler|{_F}
InstanceNormalization|{_F}
IsInf|{_F}
IsNaN|{_FI}
LayerNormalization|{_F}|only the first output `Y`
LeakyRelu|{_F}
Less|{_FI}
LessOrEqual|{_FI}
Log|{_F}
LogSoftmax|{_F}
Loop|{_FIB}|scan output length cannot be dynamic
LRN|{_F}
LSTM|{_F}
LpNormalization|{_F}
LpPool|{_F}
MatMul|{_F}
Max|{_FI}
MaxPool|{_F}
Mean|{_FI},FP8
MeanVarianceNormalization|{_F}
Min|{_FI}
Mish|FP32,FP16
Mod|{_FI}
Mul|{_FI}
Neg|{_FI}
NonMaxSuppression|FP32,FP16
NonZero|FP32,FP16
Not|BOOL
OneHot|{_FIB}|`depth` must be a build-time constant
Or|BOOL
Pad|{_FI}
ParametricSoftplus|{_F}
Pow|{_FI}
PRelu|{_F}
QuantizeLinear|{_F}|`y_zero_point` must be 0
RandomNormal|{_F}
RandomNormalLike|{_F}
RandomUniform|{_F}
RandomUniformLike|{_F}
Range|{_FI}
Reciprocal|{_F}
ReduceL1|{_FI}|{_AXES}
ReduceL2|{_FI}|{_AXES}
ReduceLogSum|{_FI}|{_AXES}
ReduceLogSumExp|{_FI}|{_AXES}
ReduceMax|{_FI}|{_AXES}
ReduceMean|{_FI}|{_AXES}
ReduceMin|{_FI}|{_AXES}
ReduceProd|{_FI}|{_AXES}
ReduceSum|{_FI}|{_AXES}
ReduceSumSquare|{_FI}|{_AXES}
Relu|{_FI}
Reshape|{_FIB}
Resize|{_F}
ReverseSequence|{_FIB}
RMSNormalization|{_F}
RNN|{_F}
RoiAlign|FP32,FP16
RotaryEmbedding|{_F}|`position_ids` must be INT64
Round|{_F}
STFT|FP32
ScaledTanh|{_F}
Scan|{_F}
Scatter|{_FI}
ScatterElements|{_FI}
ScatterND|{_FI}|`reduction` must be `none`
Selu|{_F}
Shape|{_FIB}
Shrink|{_FI}
Sigmoid|{_F}
Sign|{_FI}
Sin|{_F}
Sinh|{_F}
Size|{_FIB}
Slice|{_FIB}
Softmax|{_F}
Softplus|{_F}
Softsign|{_F}
SpaceToDepth|{_FI}
Split|{_FIB}
Sqrt|{_F}
Squeeze|{_FIB}|`axes` must be resolvable to a constant
Sub|{_FI}
Sum|{_FI}
Tan|{_F}
Tanh|{_F}
TensorScatter|{_F},INT32
ThresholdedRelu|{_F}
Tile|{_FIB}
TopK|{_FI}|`sorted` must be 1
Transpose|{_FIB}
Trilu|{_FIB}
Unsqueeze|{_FIB}|`axes` must be resolvable to a constant
Upsample|{_F}
Where|{_FIB}
Xor|BOOL
"""

# the 10.15 table's "N" rows: listed, and not imported
UNSUPPORTED = frozenset(
    """AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor CenterCropPad
    Col2Im Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder
    MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss
    Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch
    SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength
    SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit
    TfIdfVectorizer Unique""".split()
)
# supported by 10.15's table, absent or "N" in 10.1's
ADDED_AFTER_10_1 = frozenset(
    "Attention BlackmanWindow HammingWindow HannWindow RMSNormalization RotaryEmbedding STFT "
    "TensorScatter".split()
)


def _parse(table: str) -> dict[str, OpSupport]:
    out = {}
    for line in table.strip().splitlines():
        op, types, *rest = line.split("|")
        out[op] = OpSupport(op, tuple(types.split(",")), rest[0] if rest else "")
    return out


SUPPORTED: dict[str, OpSupport] = _parse(_TABLE)


def supported_ops(table_version: str) -> dict[str, OpSupport]:
    """The default-domain operators the parser of documented version ``table_version`` imports."""
    if table_version == LATEST:
        return SUPPORTED
    return {k: v for k, v in SUPPORTED.items() if k not in ADDED_AFTER_10_1}

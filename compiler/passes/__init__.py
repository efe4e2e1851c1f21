"""int8mt's own Relax passes, in the order :mod:`int8mt.compiler.pipeline` applies them."""
from .append_quantized_rows import AppendQuantizedRows
from .attention_rows import AttentionRows
from .drop_identity_broadcast import DropIdentityBroadcast
from .fold_dense_bias import FoldDenseBias
from .fuse_attention_epilogue import FuseAttentionEpilogue
from .fuse_dense_epilogue import FuseDenseEpilogue
from .gather_packed_rows import GatherPackedRows
from .greedy_loop import GreedyLoop
from .int8_batch_matmul import Int8BatchMatmul
from .keys_as_stored import ReadKeysAsStored
from .layer_norm_rows import LayerNormRows
from .lift_weights import LiftWeights, drop_weight_checks
from .mark_cuda_graph_capture import MarkCUDAGraphCapture
from .one_query_attention import OneQueryAttention
from .pack_dense import PackDense
from .quantize_once import QuantizeOnce
from .quantize_rows import QuantizeRows
from .reshapes_after_elementwise import ReshapesAfterElementwise
from .reuse_shapes import ReuseShapes
from .reuse_tensors import ReuseTensors
from .drop_unused_tuples import DropUnusedTuples
from .scale_propagation import ScalePropagation
from .softmax_rows import SoftmaxRows
from .take_as_view import TakeAsView
from .unit_permute_as_reshape import UnitPermuteAsReshape
from .unit_reshape_into_kernels import UnitReshapeIntoKernels
from .views_into_kernels import ViewsIntoKernels
from .tap_int_matmuls import TapIntMatmuls

__all__ = ["ScalePropagation", "TapIntMatmuls", "DropIdentityBroadcast", "PackDense", "FoldDenseBias",
           "Int8BatchMatmul", "ReadKeysAsStored", "GatherPackedRows", "FuseDenseEpilogue", "OneQueryAttention",
           "FuseAttentionEpilogue", "LayerNormRows", "SoftmaxRows", "QuantizeRows", "QuantizeOnce",
           "AppendQuantizedRows", "UnitPermuteAsReshape", "ReshapesAfterElementwise", "AttentionRows", "TakeAsView",
           "UnitReshapeIntoKernels", "ViewsIntoKernels", "LiftWeights", "GreedyLoop", "MarkCUDAGraphCapture",
           "ReuseShapes", "ReuseTensors", "DropUnusedTuples", "drop_weight_checks"]

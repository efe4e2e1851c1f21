"""Function attributes that mark int8mt's kernels, so that passes and reports find their calls by what
the kernel is rather than by its name."""

KERNEL_ATTR = "int8mt.kernel"  # which kernel: int8_dense, float_dense, int8_batch_matmul, int8_packed_rows, ...
DENSE_KINDS = ("int8_dense", "float_dense")  # the dense kernel with an int8 dot product, with float32 multiply-adds
DENSE_ATTR = "int8mt.dense"  # a dense kernel's weight shape (n, k), tiles and dot-product family
ATTENTION_ATTR = "int8mt.attention"  # a one-query attention kernel's heads, head_dim, dtype and lanes

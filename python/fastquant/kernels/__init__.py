"""The kernel layer: the ``torch.ops.fastquant`` operators (schemas, fake kernels, argument checks), their
pure-PyTorch references and the packers of the weight formats, the compiled extension with the queries of which
kernel runs where, and the measured sparse-vs-dense choice."""

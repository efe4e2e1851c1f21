"""Converters load other frameworks' checkpoints into :class:`~int8mt.model.transformer.Transformer`."""

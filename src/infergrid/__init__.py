"""InferGrid: a decentralized AI inference network with on-chain settlement."""

__version__ = "0.1.0"

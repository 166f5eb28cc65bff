from .residual_head import HARTResidualHead
from .tokenizer import HARTHybridTokenizer, HybridTokens
from .transformer import HARTTransformer, HARTTransformerOutput, KVCache

__all__ = ["HARTHybridTokenizer", "HARTResidualHead", "HARTTransformer", "HARTTransformerOutput", "HybridTokens", "KVCache"]

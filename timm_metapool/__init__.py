"""timm-metapool: learnable receptive fields for lightweight timm networks (Meta-Pooling and PMPL).

Importing the package registers the `mobilenetv2_metapool_*` models with timm.
"""
from .genotype import Genotype, GENOTYPE_FORMAT_VERSION
from .mixed_op import ARCH_PARAM_NAME, MetaPooling
from .mobilenetv2_metapool import MetaPoolEfficientNet, MetaPoolEfficientNetFeatures, MetaPoolingMixin
from .ops import OP_NAMES, GlobalContextEnhancer, create_op, op_name_of
from .pretrained import PRETRAINED_TAGS

__version__ = '0.1.0'

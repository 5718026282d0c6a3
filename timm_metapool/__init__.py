"""timm-metapool: learnable receptive fields for lightweight timm networks (Meta-Pooling and PMPL).

Importing the package registers the Meta-Pooling models with timm (`timm.list_models('*metapool*')`);
`add_meta_pooling(model, genotype=None)` adds the enhancer slots to any timm inverted-residual network.
It also makes timm's `config.json` reader (`local-dir:`, `hf-hub:`) name a damaged file in its error.
"""
from .genotype import Genotype, GENOTYPE_FORMAT_VERSION
from .mixed_op import ARCH_PARAM_NAME, MetaPooling
from .search_space import MetaPoolingMixin
from .blocks import SLOT_ATTR, MetaPoolInvertedResidual, MetaPoolUniversalInvertedResidual
from .hook import (
    MetaPoolEfficientNet, MetaPoolEfficientNetFeatures, MetaPoolMobileNetV3, MetaPoolMobileNetV3Features,
    add_meta_pooling,
)
from .families import METAPOOL_FAMILIES
from .ops import OP_NAMES, GlobalContextEnhancer, create_op, op_name_of
from .pretrained import PRETRAINED_TAGS, name_config_file_in_errors

name_config_file_in_errors()

__version__ = '0.1.0'

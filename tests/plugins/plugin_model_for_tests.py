"""A third-party model adapter, registered through the ttt_bench.models entry-point group."""

from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.registry import register_model


@register_model("plugin_model")
class PluginScorer(FrozenScorer):
    name = "plugin_model"

    def __init__(self, **kwargs):
        super().__init__(preset="tiny", **kwargs)

"""One dynamic partition per registry study, and the decorator of every asset of a study."""

import dagster as dg

studies = dg.DynamicPartitionsDefinition(name="study")

SETTINGS = "settings"
"""Key prefix and group of the external assets that record, per study, the registry fields each asset reads."""


def settings_key(asset: dg.AssetKey) -> dg.AssetKey:
    """The key of `asset`'s settings source: settings/<asset>."""
    return dg.AssetKey([SETTINGS, *asset.path])


def study_asset(**kwargs):
    """`dg.asset`, partitioned by study and depending on its settings source as well as on its inputs.

    Dagster then records the settings an asset was made from as an input data version, like its tables.
    """
    def decorate(fn):
        deps = [*kwargs.pop("deps", ()), settings_key(dg.AssetKey(fn.__name__))]
        return dg.asset(partitions_def=studies, deps=deps, **kwargs)(fn)

    return decorate

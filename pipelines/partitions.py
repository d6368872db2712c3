"""One dynamic partition per registry study."""

import dagster as dg

studies = dg.DynamicPartitionsDefinition(name="study")

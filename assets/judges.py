"""How far each refusal judge agrees with people's labels and with the others."""

import dagster as dg
import pyarrow as pa

from pipelines.metadata import upstream_lineage
from pipelines.partitions import study_asset
from pipelines.resources import StudyResource
from refusal_core.judge_validation import (HUMAN_LABEL_FILES, HUMAN_LABEL_LICENCE, PYRIT_PACKAGE, PYRIT_SHA256,
                                           PYRIT_VERSION, read_human_labels, validate_judges)
from refusal_core.parquet import Spool, spool, to_json
from refusal_core.tables import JUDGE_VALIDATION


@study_asset(group_name="judges", pool="gpu", kinds={"parquet"})
def judge_validation(context: dg.AssetExecutionContext, study: StudyResource, baseline_generations: pa.Table) -> dg.Output[Spool]:
    """Accuracy, precision, recall and Cohen's kappa (95% intervals) of the substring judge, and the classifier judge when the study names one, on PyRIT's human-labelled refusals (tune and report parts), and of the refusal-score judge against the substring judge on the baseline answers."""
    key = context.partition_key
    seed = study.study(key).settings.seed
    labels = read_human_labels(study.pyrit_wheel())
    table = validate_judges(key, labels, baseline_generations, study.classifier(key), seed)
    lineage = {**upstream_lineage(baseline_generations=baseline_generations), "settings": to_json({
        "bootstrap_seed": seed, "human_labels": {"source": f"{PYRIT_PACKAGE}=={PYRIT_VERSION}", "wheel_sha256": PYRIT_SHA256,
                                                 "files": HUMAN_LABEL_FILES, "licence": HUMAN_LABEL_LICENCE},
        "split": "sha256 of [objective, response]: first byte even is tune, odd is report"})}
    staged = spool([table], JUDGE_VALIDATION, study.staging_dir, lineage)
    rows = table.to_pylist()
    context.log.info("Judge kappa: %s", {f"{r['judge']}/{r['part']}": r["kappa"] for r in rows})
    return dg.Output(staged, data_version=dg.DataVersion(staged.sha256), metadata={
        f"kappa/{r['judge']}/{r['reference']}/{r['part']}": round(r["kappa"], 3) for r in rows if r["kappa"] is not None})

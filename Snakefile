# sparsescale: how loss scales with model size N and activation sparsity S, and which S is optimal at inference.
#   snakemake --cores all                          the embedded default (CPU sweep, config/default.yaml)
#   snakemake --cores all --configfile config/smoke.yaml
#   snakemake --configfile config/paper.yaml --workflow-profile profiles/slurm   (SLURM)
#   snakemake --report report.html                 figures and tables, captioned
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/default.yaml"


include: "workflow/rules/checks.smk"


# the schema and the data paths, each error as one short message
check_config(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tune.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/lmeval_common.smk"
include: "workflow/rules/lmeval.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/fit.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/superweight.smk"
include: "workflow/rules/bench.smk"


rule all:
    default_target: True
    input:
        all_targets(),
        lmeval_targets(),

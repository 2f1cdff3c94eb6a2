# Targets of the optional lm-eval rules (workflow/rules/lmeval.smk): none unless lmeval.enabled.


def lmeval_enabled():
    return bool(config.get("lmeval", {}).get("enabled"))


def lmeval_scores(wildcards=None):
    """lmeval.json of every run that has not failed (none when lmeval is off): inputs of `aggregate`."""
    if not lmeval_enabled():
        return []
    return [f"{R}/runs/{rid}/lmeval.json" for rid in all_runs() if not failed(rid)]


def lmeval_targets():
    if not lmeval_enabled():
        return []
    return lmeval_scores() + [f"{R}/figures/fig_lmeval_accuracy.png"]

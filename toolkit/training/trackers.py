"""Experiment trackers (`train.report_to`): the names transformers' Trainer can report to, and a check, before any
model loads, that each named tracker can run here.

The Trainer itself does the reporting (`report_to` goes straight into SFTConfig); it only finds out that a
tracker's package is missing when training starts, with a traceback. Here that is a one-line error from `validate`
and `sft`, naming what to install. metrics.json, loss.png and the run card are written whatever is chosen.
"""

from __future__ import annotations

from toolkit.errors import ToolkitError

ALONE = ("none", "all")  # transformers' two special values; each only makes sense on its own
# What `pip install` brings each tracker (transformers.integrations checks for these packages).
PIP_PACKAGES = {
    "azure_ml": "azureml-core",
    "comet_ml": "comet-ml",
    "dagshub": "dagshub mlflow",
    "flyte": "flytekit flytekitplugins-deck-standard",
}
# transformers.integrations' availability check for each tracker whose check is not named is_<name>_available.
CHECKS = {
    "azure_ml": ("is_azureml_available",),
    "comet_ml": ("is_comet_available",),
    "flyte": ("is_flytekit_available", "is_flyte_deck_standard_available"),
}


def known_names() -> list[str]:
    """Every tracker this transformers version reports to (its INTEGRATION_TO_CALLBACK), plus none and all."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    return [*ALONE, *INTEGRATION_TO_CALLBACK]


def as_list(report_to: str | list[str]) -> list[str]:
    return [report_to] if isinstance(report_to, str) else list(report_to)


def schema_problem(report_to: str | list[str]) -> str | None:
    """Why `train.report_to` is not a valid setting (None when it is); for the recipe schema."""
    names = as_list(report_to)
    if names == ["none"]:
        return None  # the default: no need to import transformers' integrations to check it
    if not names:
        return "give a tracker name or a list of them (none turns reporting off)"
    known = known_names()
    unknown = [name for name in names if name not in known]
    if unknown:
        return f"unknown tracker '{unknown[0]}'; choose from: {', '.join(known)}"
    if len(names) > 1 and any(name in ALONE for name in names):
        return "none and all stand alone, not in a list with other trackers"
    if len(set(names)) != len(names):
        return "a tracker is named twice"
    return None


def available(name: str) -> bool:
    """transformers' own check for the tracker (the one its callback makes), so the two never disagree."""
    import transformers.integrations as integrations

    checks = [getattr(integrations, check, None) for check in CHECKS.get(name, (f"is_{name}_available",))]
    return all(check() for check in checks if check is not None)  # no check known: the Trainer decides


def check_installed(report_to: str | list[str]) -> None:
    """Refuse, in one line naming what to install, a tracker the Trainer could not start."""
    missing = [name for name in as_list(report_to) if name not in ALONE and not available(name)]
    if "kubeflow" in missing:
        raise ToolkitError("train.report_to: kubeflow reports only inside a Kubeflow TrainJob "
                           "(KUBEFLOW_TRAINER_SERVER_URL is not set); remove it from the list")
    if not missing:
        return
    verb = "is" if len(missing) == 1 else "are"
    packages = " ".join(PIP_PACKAGES.get(name, name) for name in missing)
    raise ToolkitError(f"train.report_to: {', '.join(missing)} {verb} not installed; pip install {packages}, "
                       "or set train.report_to: none")

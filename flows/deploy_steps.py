"""Pull steps of the deployments in ``deploy/prefect.yaml``, run in each flow run's process.

Prefect fills ``{{ $VAR }}`` in a pull step twice: ``prefect deploy`` replaces it with the
variable's value when the variable is set there and otherwise keeps the placeholder
(``prefect.cli.deploy._core._run_single_deploy``: ``apply_values(pull_steps, ...,
remove_notset=False)``); the flow run replaces what is left with the worker's value, or with
``""`` when unset there too (``prefect.deployments.steps.core.run_step``). A value set at
deploy time therefore hides the worker's. The step here reads the worker's value itself, so
the folder on the machine that runs the flow wins wherever it is set.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_VARIABLE = "SEGFLOW_REPO"


def set_working_directory_from_env(deployed_directory: str = "") -> dict[str, str]:
    """Work in ``$SEGFLOW_REPO`` of the flow run's environment, else in ``deployed_directory``.

    ``SEGFLOW_REPO`` is the folder that holds ``configs/``, where the configs' relative paths
    start. ``deploy/prefect.yaml`` passes ``deployed_directory: "{{ $SEGFLOW_REPO }}"``: the
    value ``prefect deploy`` saw, or ``""`` when neither it nor the worker had one. Returns
    ``{"directory": ...}`` like Prefect's ``set_working_directory``, which does the change (a
    relative path starts where the flow run's pull steps start).

    Raises
    ------
    ValueError
        When ``SEGFLOW_REPO`` is set neither on the worker nor at deploy time.
    NotADirectoryError
        When the folder it names is not a folder here.
    """
    from prefect.deployments.steps import set_working_directory

    worker_directory = os.environ.get(REPO_VARIABLE, "")
    directory = worker_directory or deployed_directory
    if not directory:
        raise ValueError(
            f"{REPO_VARIABLE} is not set in this flow run's environment and was not set when "
            f"`prefect deploy` ran: set {REPO_VARIABLE} on the Prefect worker to the folder "
            "that holds configs/ (see deploy/README.md)"
        )
    try:
        return set_working_directory(str(Path(directory).expanduser()))
    except (FileNotFoundError, NotADirectoryError) as error:
        source = "this flow run's environment" if worker_directory else "`prefect deploy`"
        raise NotADirectoryError(
            f"{REPO_VARIABLE} ({directory!r}, from {source}) is not a folder on this machine: "
            "set it on the Prefect worker to the folder that holds configs/"
        ) from error

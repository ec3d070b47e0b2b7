"""``relaygraph models list | pull``: the offline model catalog."""

from __future__ import annotations

from typing import Annotated

import typer

from relaygraph.cli.common import err, friendly

app = typer.Typer(no_args_is_help=True, help="Offline model catalog.")


@app.command("pull")
@friendly
def models_pull(
    names: Annotated[list[str] | None, typer.Argument(help="Catalog names (default: the default pair and the call-token policy's trained controller).")] = None,
) -> None:
    """Install, join, verify (sha256) and convert catalog models into the local cache
    (adapter entries: pull the base, merge the shipped LoRA adapter)."""
    from relaygraph.agents import catalog

    for name in names or [catalog.DEFAULT_CONTROLLER, catalog.DEFAULT_EXPERT, catalog.RELAY_CONTROLLER]:
        catalog.pull(name, progress=err.print)


@app.command("list")
@friendly
def models_list() -> None:
    """List catalog models, whether they are pulled, what each is and how it was trained."""
    from relaygraph.agents import catalog

    for name, spec in catalog.CATALOG.items():
        state = "pulled" if catalog.is_pulled(name) else "not pulled"
        print(f"{name:26} {state:11} {spec.description}")
        if isinstance(spec, catalog.AdapterModel):
            print(f"{'':26} {'':11} trained: {spec.training}")

"""The built-in engines beyond this process: Ray (pip install 'safer-audit[ray]')."""

from ..hookspecs import hookimpl


def ray_executor(config):
    from ..engine.ray import RayExecutor

    return RayExecutor(config)


@hookimpl
def register_engines(register):
    register("ray", ray_executor)

"""Warm stage processes: one process imports the stages' libraries once, and each stage process is
forked from it instead of starting Python and importing torch, diffusers and MLflow again.

A stage stays an ordinary command (``maskdm <stage> ...``, the MLproject entry point) and MLflow
Projects still starts it. When ``MASKDM_WARM_SOCKET`` names a running server (:mod:`.server`) in
that command's environment, the command (:mod:`.client`) hands its arguments, working directory,
environment and standard streams to the server, which forks the stage process; the command waits
for it and exits as it exits. Without the variable, or when the server refuses (another Python,
another copy of the code, an environment that differs in anything but what the server may set per
stage), the command runs the stage itself, as it always did.

Nothing here knows MLflow or the stages: the driver (:mod:`maskdm.driver.launch`) starts a server
with the modules to import and puts its socket in the stages' environment.
"""

from maskdm.warm_start.protocol import SOCKET_ENV, WARM_START_ENV, supported  # noqa: F401

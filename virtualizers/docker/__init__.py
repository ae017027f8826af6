"""The Docker Engine virtualizer: containers run by the Docker Engine, driven through its HTTP API over its unix
socket (docs/containers.md is the operator's view).

Modules, one job each: `settings` (the ``docker:`` section), `engine` (the API client: every call bounded),
`events` (the engine's event stream, shared by the instances' monitors), `images` (an image in the engine, loaded
once from the image dir), `userdata` (what of a START's cloud-config a container honours), `container` (the
create parameters of a START), `console` (the container's output into the instance's bounded console log), `mounts` (the
volumes of the node's store a container mounts),
`virtualizer` (one instance's container, the `Virtualizer` contract), `backend` (`open_backend`, the ``docker``
entry point). It imports only the plugin API, `launcher.plugin`.
"""

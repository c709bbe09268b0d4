"""The front door: submit, dispatch, the HTTP API, the client and the `sdfarm` command."""

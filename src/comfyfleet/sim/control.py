"""The control API: make a running simulator misbehave, for integration tests.

Its routes live under `/_sim/`, which ComfyUI never uses, and (unlike ComfyUI's routes) have
no `/api` copy. Bodies and answers are JSON.

`GET /_sim`
    State: `{"name", "faults", "clients", "queue_remaining", "restarts"}`. `clients` lists the
    clientIds that currently receive messages (a socket replaced by a newer one with the same
    id, or unregistered by the same-clientId hazard, is not listed).

`GET /_sim/faults`, `POST /_sim/faults`
    Read or change the failure injection settings. POST takes any subset of
    `{"fail_rate": 0.0-1.0, "seed": int|null, "hang": bool, "view_bytes_per_second": int|null,
    "output_size": int|null, "prompt_delay": seconds|null, "system_stats_status": int|null,
    "prompt_status": int|null, "view_status": int|null, "view_cut_bytes": int|null}`
    and answers the full settings; a bad value is a 400 `{"error": message}` and changes
    nothing. Setting `seed` restarts the failure sequence.
    - `fail_rate`: each prompt fails with this probability, with an `execution_error`
      (`torch.OutOfMemoryError`) at its SimulatedWork node, else its last non-output node.
    - `hang`: websockets stay open but receive nothing (not even later); prompts still run and
      their history is recorded, so a client must notice the silence and poll.
    - `view_bytes_per_second`: /view trickles its body at this rate.
    - `output_size`: SaveImage and PreviewImage files are padded to this many bytes (zeros
      after the PNG's end, a sparse file), so multi-GB outputs cost neither time nor disk.
    - `prompt_delay`: POST /prompt holds each request this long after it arrived before it
      is read, by the current value (lowering or clearing it releases the requests held);
      if the client disconnects meanwhile the prompt is dropped, never queued. A client can
      thus be killed between deciding to queue a prompt and the server having it.
    - `system_stats_status`: GET /system_stats answers this HTTP error status; the websocket
      and the other routes are not affected.
    - `prompt_status`: POST /prompt answers this HTTP error status instead of queueing the
      prompt (once `prompt_delay` has let it go).
    - `view_status`: GET /view answers this HTTP error status instead of the file.
    - `view_cut_bytes`: GET /view promises the whole file but drops the connection after this
      many bytes of it.

`POST /_sim/drop_websockets`
    Cut every websocket connection now, with no close frame: `{"dropped": n}`.

`POST /_sim/restart`
    Crash and restart: every websocket is cut with no close frame; the running and pending
    prompts, the history, the prompt counter and the node cache are lost and no event is ever
    sent for them; temp is wiped; input and output files stay. The server keeps listening on
    the same port, so the next request already reaches the restarted server:
    `{"restarts": n}`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from comfyfleet.sim.server import SimulatedComfyUI


class ControlRoutes:
    def __init__(self, sim: SimulatedComfyUI) -> None:
        self.sim = sim

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_sim", self.state),
            web.get("/_sim/faults", self.get_faults),
            web.post("/_sim/faults", self.post_faults),
            web.post("/_sim/drop_websockets", self.drop_websockets),
            web.post("/_sim/restart", self.restart),
        ]

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.state())

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.faults.as_json())

    async def post_faults(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object")
            self.sim.faults.update(changes)
        except ValueError as error:  # bad JSON too
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response(self.sim.faults.as_json())

    async def drop_websockets(self, request: web.Request) -> web.Response:
        return web.json_response({"dropped": self.sim.drop_websockets()})

    async def restart(self, request: web.Request) -> web.Response:
        await self.sim.crash_and_restart()
        return web.json_response({"restarts": self.sim.restarts})

// The dashboard's live stream, shared by every tab of this origin (a SharedWorker): a browser
// opens at most six HTTP/1.1 connections to a host, so with a stream per tab a seventh tab
// would wait for one to close. Tabs with the same key share one stream; the worker tells each
// the events, a newcomer the latest fleet at once, and closes a stream when its last tab
// leaves. The worker lives as long as any tab of the dashboard is open, whichever opened it.

import { follow } from "./sse.js";

const groups = new Map(); // `${api} ${key}` -> { id, ports, controller, fleet, on }

function tell(group, message) {
  for (const port of group.ports) port.postMessage(message);
}

function join(port, api, key) {
  const id = `${api} ${key ?? ""}`;
  let group = groups.get(id);
  if (!group) {
    group = { id, ports: new Set(), controller: new AbortController(), fleet: null, on: false };
    groups.set(id, group);
    const shared = group;
    follow(`${api}/dashboard/events`, key ? { Authorization: `Bearer ${key}` } : {},
      (name, data) => {
        const at = Date.now(); // the fleet's unreachable_seconds count from its arrival
        if (name === "fleet") shared.fleet = { data, at };
        tell(shared, { type: "event", name, data, at });
      },
      shared.controller.signal,
      (on) => {
        shared.on = on;
        tell(shared, { type: "state", on });
      },
      (status) => tell(shared, { type: "refused", status }),
    ).finally(() => drop(shared));
  }
  group.ports.add(port);
  port.postMessage({ type: "state", on: group.on });
  if (group.fleet) port.postMessage({ type: "event", name: "fleet", ...group.fleet });
  return group;
}

function drop(group) {
  group.controller.abort();
  if (groups.get(group.id) === group) groups.delete(group.id);
}

function leave(port, group) {
  group.ports.delete(port);
  if (!group.ports.size) drop(group);
}

self.addEventListener("connect", (event) => {
  const port = event.ports[0];
  let joined = null;
  port.addEventListener("message", ({ data }) => {
    if (joined) leave(port, joined);
    joined = data.type === "follow" ? join(port, data.api, data.key) : null;
  });
  port.start();
});

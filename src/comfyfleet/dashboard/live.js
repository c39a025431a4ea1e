// The dashboard's live stream, shared by every tab of this origin (a SharedWorker): a browser
// opens at most six HTTP/1.1 connections to a host, so with a stream per tab a seventh tab
// would wait for one to close. Tabs with the same key share one stream; the worker tells each
// the events, a newcomer the latest fleet at once, and closes a stream when its last tab
// leaves. The worker lives as long as any tab of the dashboard is open, whichever opened it.
// The same stream carries the events of the jobs whose pages the tabs show (`?job=`): when
// that set changes, the stream is opened anew with the new set, and each job's events go to
// the tabs showing it.

import { follow } from "./sse.js";

// `${api} ${key}` -> { id, api, key, ports, jobs: Map(job id -> Set(port)), controller, fleet, on }
const groups = new Map();

function tell(ports, message) {
  for (const port of ports) port.postMessage(message);
}

// (Re)open the group's stream for the jobs its tabs show now; the stream it replaces ends.
function open(group) {
  group.controller?.abort();
  const controller = new AbortController();
  group.controller = controller;
  const query = [...group.jobs.keys()].map((job) => `job=${encodeURIComponent(job)}`).join("&");
  follow(`${group.api}/dashboard/events${query ? `?${query}` : ""}`,
    group.key ? { Authorization: `Bearer ${group.key}` } : {},
    (name, data) => {
      const at = Date.now(); // the fleet's unreachable_seconds count from its arrival
      if (name === "job") {
        tell(group.jobs.get(data.job) ?? [], { type: "job", job: data.job, name: data.event, data: data.data });
        return;
      }
      if (name === "fleet") group.fleet = { data, at };
      tell(group.ports, { type: "event", name, data, at });
    },
    controller.signal,
    (on) => {
      group.on = on;
      tell(group.ports, { type: "state", on });
    },
    (status) => tell(group.ports, { type: "refused", status }),
  ).finally(() => {
    if (group.controller === controller) drop(group); // else replaced by a stream with other jobs
  });
}

function join(port, api, key) {
  const id = `${api} ${key ?? ""}`;
  let group = groups.get(id);
  if (!group) {
    group = { id, api, key, ports: new Set(), jobs: new Map(), controller: null, fleet: null, on: false };
    groups.set(id, group);
    open(group);
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

function followJob(port, group, job) {
  const ports = group.jobs.get(job);
  if (ports) {
    ports.add(port); // the stream has the job already; its next event reaches this tab too
    return;
  }
  group.jobs.set(job, new Set([port]));
  open(group);
}

// Whether the stream must change: no tab shows the job any more.
function release(port, group, job) {
  const ports = group.jobs.get(job);
  if (!ports?.delete(port) || ports.size) return false;
  group.jobs.delete(job);
  return true;
}

function unfollowJob(port, group, job) {
  if (release(port, group, job)) open(group);
}

function leave(port, group) {
  group.ports.delete(port);
  if (!group.ports.size) {
    drop(group);
    return;
  }
  let released = false;
  for (const job of [...group.jobs.keys()]) released = release(port, group, job) || released;
  if (released) open(group);
}

self.addEventListener("connect", (event) => {
  const port = event.ports[0];
  let joined = null;
  port.addEventListener("message", ({ data }) => {
    if (data.type === "job" || data.type === "unjob") {
      if (joined) (data.type === "job" ? followJob : unfollowJob)(port, joined, data.job);
      return;
    }
    if (joined) leave(port, joined);
    joined = data.type === "follow" ? join(port, data.api, data.key) : null;
  });
  port.start();
});

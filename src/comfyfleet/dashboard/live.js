// The dashboard's live stream, shared by every tab of this origin (a SharedWorker): a browser
// opens at most six HTTP/1.1 connections to a host, so with a stream per tab a seventh tab
// would wait for one to close. Tabs with the same key share one stream; the worker tells each
// the events, a newcomer the latest fleet at once, and closes a stream when its last tab
// leaves. The worker lives as long as any tab of the dashboard is open, whichever opened it.
// The same stream carries the events of the jobs whose pages the tabs show (`?job=`): when
// that set changes, the stream is opened anew with the new set, and each job's events go to
// the tabs showing it. It carries the MAX_CARRIED jobs followed last; the tabs of the others
// are told so (`carried`: false) and re-read their job whenever the stream says that jobs
// changed (at most once every 2 s), until one of the carried jobs is left and theirs is
// carried again. The service refuses a stream with more (and the tabs would lose it all).

import { follow } from "./sse.js";

// The jobs one stream may carry: MAX_FOLLOWED_JOBS in api/dashboard.py.
const MAX_CARRIED = 100;
// A change of the jobs carried waits this long for more (tabs restored at once, say), so that
// a burst of them opens one stream, not one each.
const REOPEN_MS = 20;

// `${api} ${key}` -> { id, api, key, ports, jobs: Map(job id -> Set(port)), carried: Set(job id),
//   reopening, controller, fleet, on }; `jobs` in the order they were first followed.
const groups = new Map();

function tell(ports, message) {
  for (const port of ports) port.postMessage(message);
}

// (Re)open the group's stream for the jobs it carries now; the stream it replaces ends.
function open(group) {
  group.controller?.abort();
  const controller = new AbortController();
  group.controller = controller;
  const query = [...group.carried].map((job) => `job=${encodeURIComponent(job)}`).join("&");
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

// Carry the jobs followed last, tell the tabs whose job is carried no more or again, and
// reopen the stream if what it carries changed.
function carry(group) {
  const carried = new Set([...group.jobs.keys()].slice(-MAX_CARRIED));
  const changed = carried.size !== group.carried.size || [...carried].some((job) => !group.carried.has(job));
  for (const job of new Set([...carried, ...group.carried])) {
    if (carried.has(job) !== group.carried.has(job)) {
      tell(group.jobs.get(job) ?? [], { type: "carried", job, carried: carried.has(job) });
    }
  }
  group.carried = carried;
  if (changed && !group.reopening) {
    group.reopening = setTimeout(() => {
      group.reopening = null;
      if (groups.get(group.id) === group) open(group);
    }, REOPEN_MS);
  }
}

function join(port, api, key) {
  const id = `${api} ${key ?? ""}`;
  let group = groups.get(id);
  if (!group) {
    group = { id, api, key, ports: new Set(), jobs: new Map(), carried: new Set(), reopening: null, controller: null, fleet: null, on: false };
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
    ports.add(port); // the stream has the job already (or does not carry it: tell this tab)
    if (!group.carried.has(job)) port.postMessage({ type: "carried", job, carried: false });
    return;
  }
  group.jobs.set(job, new Set([port]));
  carry(group);
}

// Whether the stream may have to change: no tab shows the job any more.
function release(port, group, job) {
  const ports = group.jobs.get(job);
  if (!ports?.delete(port) || ports.size) return false;
  group.jobs.delete(job);
  return true;
}

function unfollowJob(port, group, job) {
  if (release(port, group, job)) carry(group);
}

function leave(port, group) {
  group.ports.delete(port);
  if (!group.ports.size) {
    drop(group);
    return;
  }
  let released = false;
  for (const job of [...group.jobs.keys()]) released = release(port, group, job) || released;
  if (released) carry(group);
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

// comfyfleet's operator dashboard: plain JS, no build step. It calls the API with the key typed
// in (kept in this tab's sessionStorage) and follows the service's Server-Sent Events, read
// with fetch() so that they carry the key too (sse.js; the dashboard's own stream is shared by
// the tabs, live.js). Every value from the API is put in the page
// as text (textContent, attributes), never as HTML.

import { follow } from "./sse.js";

const API = document.querySelector('meta[name="comfyfleet-api"]').content;
const KEY_STORAGE = "comfyfleet.key";
const STATES = ["queued", "dispatched", "running", "uploading", "succeeded", "failed", "cancelled"];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const PAGE_SIZE = 50;

const state = {
  key: sessionStorage.getItem(KEY_STORAGE),
  admin: false,
  tenants: [], // every key's name (admin keys only), for the jobs page's filter
  fleet: null, // the latest `fleet` event: every backend as GET /backends shows it
  fleetAt: 0, // when it arrived (unreachable_seconds count from then)
  view: null, // the page shown: {name, render(), onJobs?(), close?()}
  live: null, // the dashboard's stream, { close() }
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// A view paints only while it is the page shown: an answer that arrives after the operator
// moved on (a reload woken by the live stream, say) must not paint over the new page.
function shownNow(view) {
  return state.view === view;
}

function headers(extra = {}) {
  return state.key ? { ...extra, Authorization: `Bearer ${state.key}` } : extra;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(API + path, init);
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (response.status === 401) showLogin(data?.error?.message);
  if (!response.ok) throw new ApiError(response.status, data?.error?.message ?? response.statusText);
  return data;
}

// Follow one of the API's event streams with this tab's key, until `signal` aborts.
function followApi(path, onEvent, signal, onState) {
  return follow(API + path, headers(), onEvent, signal, onState, (status) => {
    if (status === 401) showLogin();
  });
}

// The dashboard's live stream: `onEvent(name, data, at)`, `at` when the event arrived. Shared
// with the other tabs through live.js where the browser has SharedWorker (see there why); a
// tab of its own otherwise. Returns what closes it, and `followJob(id, onEvent, onCarried)`:
// the job's events (`onEvent(name, data)`, as GET /jobs/{id}/events?previews=true has them),
// carried by the shared stream, until the function it returns is called; `onCarried(false)`
// when the stream carries them no more (too many job pages are open: live.js), true again.
function openLive(onEvent, onState) {
  if (typeof SharedWorker !== "function") {
    const controller = new AbortController();
    followApi("/dashboard/events", (name, data) => onEvent(name, data, Date.now()), controller.signal, onState);
    return {
      close: () => controller.abort(),
      followJob(job, onJobEvent) {
        const own = new AbortController();
        followApi(`/jobs/${job}/events?previews=true`, onJobEvent, own.signal);
        return () => own.abort();
      },
    };
  }
  const { port } = new SharedWorker(new URL("./live.js", import.meta.url),
    { type: "module", name: "comfyfleet-live" });
  const jobs = new Map(); // job id -> { onJobEvent, onCarried }, of the job page shown
  port.addEventListener("message", ({ data }) => {
    if (data.type === "event") onEvent(data.name, data.data, data.at);
    else if (data.type === "job") jobs.get(data.job)?.onJobEvent(data.name, data.data);
    else if (data.type === "carried") jobs.get(data.job)?.onCarried(data.carried);
    else if (data.type === "state") onState(data.on);
    else if (data.type === "refused" && data.status === 401) showLogin();
  });
  port.start();
  const join = () => {
    port.postMessage({ type: "follow", api: API, key: state.key });
    for (const job of jobs.keys()) port.postMessage({ type: "job", job });
  };
  const leave = () => port.postMessage({ type: "leave" });
  const back = (event) => { if (event.persisted) join(); }; // restored from the back/forward cache
  window.addEventListener("pagehide", leave);
  window.addEventListener("pageshow", back);
  join();
  return {
    close() {
      leave();
      window.removeEventListener("pagehide", leave);
      window.removeEventListener("pageshow", back);
      port.close();
    },
    followJob(job, onJobEvent, onCarried) {
      const following = { onJobEvent, onCarried };
      jobs.set(job, following);
      port.postMessage({ type: "job", job });
      return () => {
        if (jobs.get(job) !== following) return;
        jobs.delete(job);
        port.postMessage({ type: "unjob", job });
      };
    },
  };
}

// --- DOM helpers ------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name in element && typeof value !== "string") element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

const main = () => document.getElementById("main");

function badge(text, kind = text) {
  return h("span", { class: `badge ${kind}` }, text);
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

function since(iso) {
  return iso ? (Date.now() - new Date(iso).getTime()) / 1000 : null;
}

function problem(error) {
  return h("p", { class: "error", role: "alert" }, error.message || String(error));
}

// A button that runs `action`, disabled meanwhile; errors are shown beside it.
function actionButton(label, action, attrs = {}) {
  const button = h("button", { type: "button", ...attrs }, label);
  button.addEventListener("click", async () => {
    button.disabled = true;
    button.parentElement?.querySelector(".error")?.remove();
    try {
      await action();
    } catch (error) {
      button.after(h("span", { class: "error" }, ` ${error.message}`));
    } finally {
      button.disabled = false;
    }
  });
  return button;
}

// --- Fleet ------------------------------------------------------------------------------------

function fleetView() {
  return {
    name: "fleet",
    render() {
      const root = main();
      root.replaceChildren(h("h2", {}, "Fleet"));
      if (state.fleet === null) {
        root.append(h("p", { class: "muted" }, "Waiting for the fleet…"));
        return;
      }
      const backends = state.fleet;
      const up = backends.filter((b) => b.healthy).length;
      const inflight = backends.reduce((sum, b) => sum + b.inflight, 0);
      root.append(
        h("div", { class: "cards" },
          card(`${up} / ${backends.length}`, "backends up"),
          card(backends.filter((b) => b.draining).length, "draining"),
          card(inflight, "prompts in flight")),
        h("table", { id: "fleet" },
          h("thead", {}, h("tr", {},
            h("th", {}, "Backend"), h("th", {}, "Health"), h("th", {}, "Websocket"),
            h("th", { class: "num" }, "Queue"), h("th", { class: "num" }, "In flight"),
            h("th", { class: "num" }, "Speed"), h("th", {}, "Warm models"), h("th", {}, "Cleanup"),
            h("th", {}, "Capabilities"), h("th", {}, "Last error"),
            state.admin ? h("th", {}, "Actions") : null)),
          h("tbody", {}, backends.map(backendRow))),
      );
      if (!backends.length) root.append(h("p", { class: "muted" }, "No backends configured."));
    },
  };
}

function card(value, label) {
  return h("div", { class: "card" }, h("div", { class: "value" }, value), h("div", { class: "label" }, label));
}

function backendRow(backend) {
  const health = !backend.healthy ? badge("down") : backend.draining ? badge("draining") : badge("up", "ok");
  const downFor = backend.unreachable_seconds + (Date.now() - state.fleetAt) / 1000;
  const caps = backend.capabilities;
  return h("tr", { "data-backend": backend.name, "data-draining": String(backend.draining) },
    h("td", {}, h("strong", {}, backend.name), h("div", { class: "muted" }, backend.url)),
    h("td", { class: "health" }, health),
    h("td", {}, backend.healthy ? "connected" : `reconnecting (down ${duration(downFor)})`),
    h("td", { class: "num" }, backend.queue_remaining),
    h("td", { class: "num inflight" }, backend.inflight),
    h("td", { class: "num" }, backend.speed === null || backend.speed === undefined ? "—" : `${backend.speed}×`),
    h("td", { class: "warm" }, warmCache(backend.cache)),
    h("td", {}, backend.cleanup ? badge(`on (${backend.cleanup})`, "ok") : badge("off")),
    h("td", { class: "muted" }, caps ? capabilitySummary(caps) : "—"),
    h("td", { class: "error-text" }, backend.last_error ?? ""),
    state.admin ? h("td", {}, h("div", { class: "actions" }, backendActions(backend))) : null,
  );
}

// What the gateway believes the backend's node cache holds (GET /backends' `cache`): the model
// files its loaders have loaded, and how many node results it keeps under which policy.
function warmCache(cache) {
  if (!cache) return "—";
  const models = cache.models.map((entry) => {
    const [loader, file] = entry.split("=", 2);
    return h("div", { class: "model", title: loader, "data-model": file }, file);
  });
  return [...(models.length ? models : [h("div", { class: "muted" }, "no model loaded")]),
    h("div", { class: "muted" }, `${cache.held_nodes} nodes cached (${cache.policy})`)];
}

function capabilitySummary(caps) {
  if (typeof caps !== "object") return String(caps);
  return Object.entries(caps)
    .map(([name, value]) => `${name}: ${Array.isArray(value) ? value.length : typeof value === "object" && value ? Object.keys(value).length : value}`)
    .join(", ");
}

function backendActions(backend) {
  // The table shows what the live stream last said; the stream tells of the change made here
  // too, so the page never holds a state the stream does not know it has.
  const path = `/backends/${encodeURIComponent(backend.name)}`;
  return [
    backend.draining
      ? actionButton("Enable", () => api("PATCH", path, { drain: false }), { class: "enable" })
      : actionButton("Drain", () => api("PATCH", path, { drain: true }), { class: "drain" }),
    actionButton("Remove", async () => {
      if (confirm(`Remove backend ${backend.name}?`)) await api("DELETE", path);
    }, { class: "remove danger", disabled: !backend.draining || backend.inflight > 0 }),
  ];
}

// --- Jobs -------------------------------------------------------------------------------------

// The jobs page's filters, as the page's address carries them. `from` and `to` are the
// browser's local times (what a datetime-local input holds); the API gets them in UTC.
const JOB_FILTERS = ["status", "workflow", "tenant", "from", "to"];

function jobsView(query) {
  const filters = Object.fromEntries(JOB_FILTERS.map((name) => [name, query.get(name) || ""]));
  let cursors = [null]; // the cursor of each page seen, to go back
  let shown = null;
  async function load() {
    const params = new URLSearchParams({ limit: PAGE_SIZE });
    for (const name of ["status", "workflow", "tenant"]) if (filters[name]) params.set(name, filters[name]);
    if (filters.from) params.set("created_after", new Date(filters.from).toISOString());
    if (filters.to) params.set("created_before", new Date(filters.to).toISOString());
    const cursor = cursors[cursors.length - 1];
    if (cursor) params.set("cursor", cursor);
    shown = await api("GET", `/jobs?${params}`);
    if (shownNow(view)) draw();
  }
  function draw() {
    const tbody = document.querySelector("#jobs tbody");
    if (!tbody) return;
    tbody.replaceChildren(...shown.jobs.map(jobRow));
    document.getElementById("jobs-empty").hidden = shown.jobs.length > 0;
    document.getElementById("jobs-next").disabled = !shown.next_cursor;
    document.getElementById("jobs-prev").disabled = cursors.length < 2;
  }
  const view = {
    name: "jobs",
    async render() {
      const form = h("form", { class: "filters" },
        h("label", {}, "Status ", h("select", { name: "status" },
          h("option", { value: "" }, "any"),
          STATES.map((s) => h("option", { value: s, selected: s === filters.status }, s)))),
        h("label", {}, "Workflow ", h("input", { name: "workflow", value: filters.workflow, placeholder: "any" })),
        state.admin ? h("label", {}, "Tenant ", tenantChoice(filters.tenant)) : null,
        h("label", {}, "Created from ", h("input", { name: "from", type: "datetime-local", value: filters.from })),
        h("label", {}, "to ", h("input", { name: "to", type: "datetime-local", value: filters.to })),
        h("button", { type: "submit" }, "Filter"));
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        const data = new FormData(form);
        const params = new URLSearchParams();
        for (const name of JOB_FILTERS) if (data.get(name)) params.set(name, data.get(name));
        location.hash = `#/jobs${params.size ? `?${params}` : ""}`;
      });
      main().replaceChildren(
        h("h2", {}, "Jobs"), form,
        h("table", { id: "jobs" }, h("thead", {}, h("tr", {},
          h("th", {}, "Job"), h("th", {}, "Workflow"), h("th", {}, "Status"), h("th", {}, "Progress"),
          h("th", {}, "Backend"), h("th", {}, "Created"), h("th", {}, "Finished"))), h("tbody")),
        h("p", { id: "jobs-empty", class: "muted", hidden: true }, "No jobs."),
        h("div", { class: "actions" },
          h("button", { id: "jobs-prev", type: "button", onclick: () => { cursors.pop(); load(); } }, "← Newer"),
          h("button", { id: "jobs-next", type: "button", onclick: () => { cursors.push(shown.next_cursor); load(); } }, "Older →")));
      await load();
    },
    onJobs() {
      if (cursors.length === 1) load(); // the newest page follows the jobs; older pages stay put
    },
  };
  return view;
}

// A choice of every key's name, as /dashboard/me gave them (admin keys only).
function tenantChoice(chosen) {
  return h("select", { name: "tenant" }, h("option", { value: "" }, "any"),
    state.tenants.map((name) => h("option", { value: name, selected: name === chosen }, name)));
}

function jobRow(job) {
  return h("tr", { "data-job": job.id, "data-status": job.status },
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, h("code", {}, job.id.slice(0, 8)))),
    h("td", {}, job.workflow),
    h("td", {}, badge(job.status)),
    h("td", {}, h("progress", { max: 1, value: job.progress })),
    h("td", {}, job.backend ?? "—"),
    h("td", {}, when(job.created_at)),
    h("td", {}, when(job.finished_at)));
}

function jobView(jobId) {
  let job = null;
  let unfollow = null; // stops the job's events
  let carried = true; // whether the shared stream carries them (else re-read on `jobs`)
  let told = 0; // changes drawn: a read begun before the latest is stale when it answers
  async function reload() {
    const asked = ++told;
    const found = await api("GET", `/jobs/${jobId}`);
    if (asked !== told || !shownNow(view)) return;
    job = found;
    draw();
    await loadDeliveries();
  }
  function draw() {
    const cancellable = !TERMINAL.has(job.status);
    main().replaceChildren(...[
      h("h2", {}, "Job ", h("code", {}, job.id), " ", h("span", { id: "job-status" }, badge(job.status))),
      h("div", { class: "actions" },
        cancellable ? actionButton("Cancel", async () => { job = await api("POST", `/jobs/${jobId}/cancel`); draw(); },
          { id: "job-cancel", class: "danger" }) : null),
      timeline(job),
      h("p", {}, h("progress", { id: "job-progress", max: 1, value: job.progress }), " ",
        h("span", { id: "job-progress-text" }, `${Math.round(job.progress * 100)} %`), " ",
        h("span", { id: "job-eta", class: "muted" })),
      h("p", { id: "job-waiting", class: "muted" }, job.waiting ?? ""),
      h("img", { id: "job-preview", class: "preview", alt: "live preview", hidden: true }),
      h("dl", { class: "facts" },
        h("dt", {}, "Workflow"), h("dd", {}, job.workflow),
        h("dt", {}, "Backend"), h("dd", { id: "job-backend" }, job.backend ?? "—"),
        h("dt", {}, "Attempts"), h("dd", {}, job.attempts),
        h("dt", {}, "Client task id"), h("dd", {}, job.client_task_id ?? "—"),
        h("dt", {}, "Callback"), h("dd", {}, job.callback_url ?? "—"),
        h("dt", {}, "Parameters"), h("dd", {}, h("code", {}, JSON.stringify(job.params)))),
      job.error ? jobError(job.error) : null,
      job.outputs.length ? h("h3", {}, "Outputs") : null,
      job.outputs.length ? h("div", { class: "outputs", id: "job-outputs" }, job.outputs.map(output)) : null,
      h("h3", {}, "Webhook deliveries"),
      h("div", { id: "job-deliveries" }, h("p", { class: "muted" }, "…")),
    ].filter(Boolean));
  }
  async function loadDeliveries() {
    const found = await api("GET", `/jobs/${jobId}/deliveries`);
    const target = document.getElementById("job-deliveries");
    if (!target || !shownNow(view)) return;
    if (!found.deliveries.length) {
      target.replaceChildren(h("p", { class: "muted" }, job.callback_url ? "None yet." : "No callback URL."));
      return;
    }
    target.replaceChildren(deliveriesTable(found.deliveries, loadDeliveries, false));
  }
  function onEvent(name, data) {
    if (name === "state") {
      const progress = document.getElementById("job-progress");
      if (!progress) return;
      if (data.status !== job.status) {
        job = { ...job, status: data.status, backend: data.backend, progress: data.progress };
        return reload(); // timestamps moved too
      }
      progress.value = data.progress;
      document.getElementById("job-progress-text").textContent = `${Math.round(data.progress * 100)} %`;
      document.getElementById("job-eta").textContent = data.eta_seconds === null ? "" : `about ${duration(data.eta_seconds)} left`;
      document.getElementById("job-waiting").textContent = [
        data.queue_position ? `position ${data.queue_position} in the queue` : "", data.waiting ?? ""].filter(Boolean).join(" — ");
    } else if (name === "preview") {
      const preview = document.getElementById("job-preview");
      if (preview) { preview.src = data.image; preview.hidden = false; }
    } else if (TERMINAL.has(name)) {
      stopFollowing();
      told += 1;
      job = data;
      draw();
      loadDeliveries();
    }
  }
  function stopFollowing() {
    unfollow?.();
    unfollow = null;
    carried = true;
  }
  const view = {
    name: "job",
    async render() {
      await reload();
      // Over the dashboard's stream, which the tabs share: a stream per job page would take
      // one of the six connections a browser opens to a host.
      if (!TERMINAL.has(job.status) && shownNow(view) && state.live) {
        stopFollowing();
        unfollow = state.live.followJob(jobId, onEvent, (on) => { carried = on; });
      }
    },
    async onJobs() {
      if (TERMINAL.has(job?.status)) {
        loadDeliveries(); // a redelivery may have been answered
      } else if (!carried) {
        // The stream does not carry this job's events: read it when jobs changed.
        await reload();
        if (TERMINAL.has(job.status)) stopFollowing();
      }
    },
    close: stopFollowing,
  };
  return view;
}

function timeline(job) {
  const steps = [["queued", job.created_at], ["dispatched", job.dispatched_at], ["running", job.started_at],
    ["uploading", job.uploading_at], [TERMINAL.has(job.status) ? job.status : "done", job.finished_at]];
  return h("ol", { class: "timeline", id: "job-timeline" }, steps.map(([label, at]) =>
    h("li", { class: at ? "done" : "", "data-step": label }, label, h("span", { class: "when" }, at ? when(at) : "—"))));
}

function jobError(error) {
  const node = error.node_id ? `node ${error.node_id}${error.node_type ? ` (${error.node_type})` : ""}` : null;
  const traceback = error.details?.traceback;
  return h("div", { class: "job-error", id: "job-error" },
    h("h3", {}, "Error: ", h("code", {}, error.type)),
    node ? h("p", { id: "job-error-node" }, node) : null,
    h("p", { id: "job-error-message" }, error.message),
    error.details?.exception_type ? h("p", { class: "muted" }, error.details.exception_type) : null,
    traceback ? h("pre", { id: "job-traceback" }, Array.isArray(traceback) ? traceback.join("") : String(traceback)) : null,
    error.details && !traceback ? h("pre", {}, JSON.stringify(error.details, null, 2)) : null);
}

function output(item, index) {
  const type = item.content_type || "";
  const caption = h("figcaption", {}, `${item.node_id} · ${item.filename ?? ""} · ${item.size ?? "?"} bytes`);
  const href = item.url;
  let body;
  if (href && type.startsWith("image/")) body = h("a", { href, target: "_blank", rel: "noopener" }, h("img", { src: href, alt: item.filename ?? `output ${index}`, loading: "lazy" }));
  else if (href && type.startsWith("video/")) body = h("video", { src: href, controls: true, preload: "metadata" });
  else if (href && type.startsWith("audio/")) body = h("audio", { src: href, controls: true, preload: "metadata" });
  else if (href) body = h("a", { href, target: "_blank", rel: "noopener" }, item.filename ?? "download");
  else body = h("pre", {}, JSON.stringify(item.value ?? item, null, 2));
  return h("figure", { "data-output": index }, body, caption);
}

function deliveriesTable(deliveries, afterRedeliver, withJob) {
  return h("table", { class: "deliveries" },
    h("thead", {}, h("tr", {},
      withJob ? h("th", {}, "Job") : null, h("th", {}, "Event"), h("th", {}, "Receiver"), h("th", {}, "Status"),
      h("th", {}, "Attempts"), h("th", {}, "Last error"), h("th", {}, "Next attempt"), h("th", {}))),
    h("tbody", {}, deliveries.map((d) => h("tr", { "data-delivery": d.id, "data-attempts": d.attempts.length },
      withJob ? h("td", {}, h("a", { href: `#/jobs/${d.job_id}` }, h("code", {}, d.job_id.slice(0, 8)))) : null,
      h("td", {}, d.event_type),
      h("td", {}, h("code", {}, d.url)),
      h("td", {}, badge(d.status)),
      h("td", { class: "attempts" }, d.attempts.length
        ? d.attempts.map((a) => h("div", {}, `${a.status_code ?? "no answer"} · ${a.latency_ms} ms · ${when(a.attempted_at)}`))
        : d.last_status_code ?? "—"),
      h("td", { class: "error-text" }, d.last_error ?? ""),
      h("td", {}, d.status === "pending" ? when(d.next_attempt_at) : "—"),
      h("td", {}, actionButton("Redeliver", async () => {
        await api("POST", `/deliveries/${d.id}/redeliver`);
        await afterRedeliver();
      }, { class: "redeliver" }))))));
}

// --- Backlog and webhooks ---------------------------------------------------------------------

// The chart counts whole minutes: it is re-read at most this often, the backlog at every change.
const ACTIVITY_EVERY_MS = 30000;
// The ETA assumes the backlog drains as fast as jobs finished over the last minutes.
const DRAIN_MINUTES = 10;
const SERIES = [["submitted", "#2f5bd3"], ["succeeded", "#1a7f37"], ["failed", "#cf222e"]];

function backlogView() {
  let activity = null;
  let activityAt = 0;
  async function load() {
    const stale = Date.now() - activityAt > ACTIVITY_EVERY_MS;
    const [backlog, fresh] = await Promise.all([
      api("GET", "/dashboard/backlog"), stale ? api("GET", "/dashboard/activity") : null]);
    if (fresh) {
      activity = fresh;
      activityAt = Date.now();
    }
    if (shownNow(view)) draw(backlog);
  }
  function draw(backlog) {
    const columns = ["queued", "dispatched", "running", "uploading"];
    const eta = drainSeconds(backlog.queued, activity);
    main().replaceChildren(...[
      h("h2", {}, "Backlog"),
      h("div", { class: "cards" },
        h("div", { class: "card", id: "backlog-queued" }, h("div", { class: "value" }, backlog.queued), h("div", { class: "label" }, "queued")),
        h("div", { class: "card", id: "backlog-oldest" }, h("div", { class: "value" }, duration(since(backlog.oldest_queued_at))), h("div", { class: "label" }, "oldest wait")),
        h("div", { class: "card", id: "backlog-eta" }, h("div", { class: "value" }, backlog.queued === 0 ? "—" : eta === null ? "unknown" : duration(eta)),
          h("div", { class: "label" }, `to drain, at the last ${DRAIN_MINUTES} minutes' pace`))),
      h("h3", {}, "By workflow"),
      countsTable("backlog", "Workflow", columns, backlog.workflows.map((w) => [w.workflow, w.counts,
        h("a", { href: `#/jobs?workflow=${encodeURIComponent(w.workflow)}&status=queued` }, w.workflow),
        duration(since(w.oldest_queued_at))]), "Oldest wait"),
      backlog.workflows.length ? "" : h("p", { class: "muted" }, "Nothing waiting."),
      backlog.tenants.length ? [h("h3", {}, "By tenant"),
        countsTable("backlog-tenants", "Tenant", columns, backlog.tenants.map((t) => [t.tenant, t.counts,
          // Only a key's jobs can be listed by its name (not those of no key, or of one gone).
          state.tenants.includes(t.tenant)
            ? h("a", { href: `#/jobs?tenant=${encodeURIComponent(t.tenant)}&status=queued` }, t.tenant)
            : t.tenant]))] : "",
      activity ? activityChart(activity) : "",
      activity?.utilisation.length ? utilisationTable(activity.utilisation) : ""].flat());
  }
  const view = { name: "backlog", render: load, onJobs: load };
  return view;
}

// rows: [key, counts, first cell, extra cell?]
function countsTable(id, label, columns, rows, extra) {
  return h("table", { id },
    h("thead", {}, h("tr", {}, h("th", {}, label), columns.map((c) => h("th", { class: "num" }, c)),
      extra ? h("th", {}, extra) : null)),
    h("tbody", {}, rows.map(([key, counts, first, last]) => h("tr", { "data-key": key },
      h("td", {}, first), columns.map((c) => h("td", { class: "num", "data-count": c }, counts[c] ?? 0)),
      extra ? h("td", {}, last) : null))));
}

function drainSeconds(queued, activity) {
  if (!activity) return null;
  const recent = activity.minutes.slice(-DRAIN_MINUTES);
  const done = recent.reduce((sum, m) => sum + m.succeeded + m.failed, 0);
  const elapsed = (Date.now() - new Date(recent[0].minute).getTime()) / 1000;
  return done && elapsed > 0 ? queued / (done / elapsed) : null;
}

// Jobs per minute over the last hour, one line a series, as plain SVG.
function activityChart(activity) {
  const width = 720, height = 160, pad = 24;
  const minutes = activity.minutes;
  const top = Math.max(1, ...minutes.flatMap((m) => SERIES.map(([name]) => m[name])));
  const x = (i) => pad + (i * (width - 2 * pad)) / Math.max(1, minutes.length - 1);
  const y = (v) => height - pad - (v * (height - 2 * pad)) / top;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "chart");
  const line = (attrs) => {
    const element = document.createElementNS("http://www.w3.org/2000/svg", attrs.tag);
    for (const [name, value] of Object.entries(attrs)) if (name !== "tag") element.setAttribute(name, value);
    svg.append(element);
    return element;
  };
  line({ tag: "line", x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, stroke: "#b7bfcc" });
  line({ tag: "text", x: 2, y: pad - 8, fill: "#6a7282", "font-size": 11 }).textContent = `${top} / min`;
  line({ tag: "text", x: pad, y: height - 6, fill: "#6a7282", "font-size": 11 }).textContent = "an hour ago";
  line({ tag: "text", x: width - pad - 24, y: height - 6, fill: "#6a7282", "font-size": 11 }).textContent = "now";
  for (const [name, color] of SERIES) {
    line({ tag: "polyline", fill: "none", stroke: color, "stroke-width": 2, "data-series": name,
      "data-total": minutes.reduce((sum, m) => sum + m[name], 0),
      points: minutes.map((m, i) => `${x(i).toFixed(1)},${y(m[name]).toFixed(1)}`).join(" ") });
  }
  return h("div", { id: "activity" }, h("h3", {}, "Jobs per minute, last hour"),
    h("div", { class: "legend" }, SERIES.map(([name]) => h("span", { class: `series-${name}` }, `— ${name} `))),
    svg);
}

function utilisationTable(utilisation) {
  return [h("h3", {}, "Backend utilisation, last hour"),
    h("table", { id: "utilisation" },
      h("thead", {}, h("tr", {}, h("th", {}, "Backend"), h("th", {}, "Executing jobs"))),
      h("tbody", {}, utilisation.map((u) => h("tr", { "data-backend": u.backend },
        h("td", {}, u.backend),
        h("td", { class: "busy", "data-busy": u.busy },
          h("progress", { max: 1, value: u.busy }), ` ${(u.busy * 100).toFixed(1)} %`)))))];
}

function webhooksView() {
  async function load() {
    const found = await api("GET", "/dashboard/deliveries");
    if (!shownNow(view)) return;
    main().replaceChildren(
      h("h2", {}, "Webhooks in trouble"),
      h("p", { class: "muted" }, "Deliveries that failed for good, ran out of time (dead), or are being retried after a failure."),
      found.deliveries.length ? deliveriesTable(found.deliveries, load, true) : h("p", { class: "muted", id: "webhooks-none" }, "Every webhook is delivered."));
  }
  const view = { name: "webhooks", render: load, onJobs: load };
  return view;
}

// --- Routing, login, the live stream ----------------------------------------------------------

function route() {
  const [path, search] = (location.hash.slice(1) || "/fleet").split("?");
  const query = new URLSearchParams(search);
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "jobs" && parts[1]) return jobView(parts[1]);
  if (parts[0] === "jobs") return jobsView(query);
  if (parts[0] === "backlog") return backlogView();
  if (parts[0] === "webhooks") return webhooksView();
  return fleetView();
}

async function show() {
  state.view?.close?.();
  state.view = route();
  for (const link of document.querySelectorAll("header nav a")) {
    link.classList.toggle("active", link.dataset.nav === (state.view.name === "job" ? "jobs" : state.view.name));
  }
  try {
    await state.view.render();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) main().replaceChildren(problem(error));
  }
}

function showLogin(message) {
  state.live?.close();
  state.live = null;
  document.getElementById("main").replaceChildren();
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message && state.key ? message : "";
  document.getElementById("logout").hidden = true;
}

async function start() {
  const live = document.getElementById("live");
  state.live?.close();
  // Opened while /dashboard/me is asked: the fleet page waits for the stream's first event,
  // and the worker and its stream take longer to start than the answer (a wrong key gets a
  // 401 from both, and the login closes the stream).
  state.live = openLive((name, data, at) => {
    if (name === "fleet") {
      state.fleet = data;
      state.fleetAt = at;
      if (state.view?.name === "fleet") state.view.render();
    } else if (name === "jobs") {
      state.view?.onJobs?.();
    }
  }, (on) => {
    live.classList.toggle("on", on);
    live.textContent = on ? "live" : "offline";
  });
  let me;
  try {
    me = await api("GET", "/dashboard/me");
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) {
      state.live?.close();
      state.live = null;
      main().replaceChildren(problem(error));
    }
    return;
  }
  state.admin = me.admin;
  state.tenants = me.tenants;
  document.getElementById("login").hidden = true;
  document.getElementById("who").textContent = !me.keys ? "open (no API keys)" : me.admin ? "admin key" : "tenant key";
  document.getElementById("logout").hidden = !me.keys;
  await show();
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = document.getElementById("login-key").value.trim();
  sessionStorage.setItem(KEY_STORAGE, state.key);
  start();
});
document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = null;
  showLogin();
});
window.addEventListener("hashchange", () => { if (state.live) show(); });
start();

// The dashboard's behaviour: the queue refreshes itself from /queue.json; a job's page follows the job's
// Server-Sent Events (state, step, epoch, final), draws its learning curves as inline SVG, loads the log
// and sends Cancel / Resume. The page's Content-Security-Policy allows no inline script, so everything
// the script needs comes from data- attributes and <meta> tags. Text from the server is only ever set
// as textContent, never parsed as HTML.
(function () {
  "use strict";

  const SVG = "http://www.w3.org/2000/svg";
  const TERMINAL = ["SUCCEEDED", "FAILED", "CANCELLED"];
  const QUEUE_EVERY_MS = 2000;
  const PENDING_EVERY_MS = 5000;

  function csrf() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function isNum(x) {
    return typeof x === "number" && Number.isFinite(x);
  }

  function fmt(x, digits) {
    return isNum(x) ? x.toFixed(digits === undefined ? 4 : digits) : "—";
  }

  function pct(x) {
    return isNum(x) ? (100 * x).toFixed(2) + " %" : "—";
  }

  function lrText(x) {
    return isNum(x) ? String(Number(x.toPrecision(3))) : "—";
  }

  // the same words as dashboard.py's relative()
  function span(seconds) {
    const s = Math.floor(Math.abs(seconds));
    if (s < 60) return "<1 min";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function relative(t, now) {
    return t >= now ? "in " + span(t - now) : span(now - t) + " ago";
  }

  // An error reply's one-line message: the API answers {"error": ..., "kind": ...}.
  async function errorOf(resp) {
    const text = await resp.text();
    try {
      const body = JSON.parse(text);
      if (body && body.error) return body.error;
    } catch (_) {
      // not JSON: fall through to the text
    }
    return text.trim() || resp.status + " " + resp.statusText;
  }

  function localizeTimes(root) {
    for (const node of (root || document).querySelectorAll("time[data-local]")) {
      const when = new Date(node.getAttribute("datetime"));
      if (!Number.isNaN(when.getTime())) {
        node.title = node.textContent;
        node.textContent = when.toLocaleString();
      }
    }
  }

  // -- the queue --------------------------------------------------------------------------------------

  // One row, as dashboard.py's _row_html renders it.
  function queueRow(row) {
    const tr = el("tr", { "data-job-id": row.id });
    const job = el("td");
    job.append(el("a", { href: "/jobs/" + encodeURIComponent(row.id) }, row.id));
    job.append(el("div", { class: "sub" }, row.name));
    const state = el("td");
    state.append(el("span", { class: "badge state-" + row.state.toLowerCase() }, row.state));
    if (row.cancel_requested) state.append(el("div", { class: "sub note" }, "cancel requested"));
    const progress = el("td", { class: "progress" });
    if (isNum(row.progress)) progress.append(el("progress", { max: "1", value: row.progress.toFixed(4) }));
    progress.append(el("div", { class: "sub" }, row.progress_text));
    tr.append(
      job,
      state,
      el("td", {}, row.user),
      el("td", {}, row.team),
      el("td", { class: "num" }, row.priority),
      el("td", { class: "num" }, row.position === null || row.position === undefined ? "—" : "#" + row.position),
      el("td", { class: "why" }, row.why),
      el("td", { class: "eta", title: row.eta_title }, row.eta),
      progress,
    );
    return tr;
  }

  function initQueue() {
    const body = $("jobs");
    const stamp = $("refreshed");
    let timer = null;

    async function refresh() {
      try {
        const resp = await fetch("/queue.json", { credentials: "same-origin", cache: "no-store" });
        if (resp.status === 401) {
          window.location.assign("/login");
          return;
        }
        if (!resp.ok) throw new Error(await errorOf(resp));
        const data = await resp.json();
        body.replaceChildren(...data.jobs.map(queueRow));
        $("empty").hidden = data.jobs.length > 0;
        $("hidden-jobs").textContent = data.hidden
          ? data.hidden + " older ended jobs not shown; see alexnet-dist list."
          : "";
        stamp.textContent = "updated " + new Date().toLocaleTimeString();
        stamp.classList.remove("error");
      } catch (err) {
        stamp.textContent = "cannot refresh: " + err.message;
        stamp.classList.add("error");
      }
    }

    function start() {
      if (timer === null) timer = setInterval(refresh, QUEUE_EVERY_MS);
    }

    function stop() {
      if (timer !== null) clearInterval(timer);
      timer = null;
    }

    // a hidden tab polls nothing; it catches up at once when shown again
    document.addEventListener("visibilitychange", function () {
      if (document.hidden) {
        stop();
      } else {
        refresh();
        start();
      }
    });
    stamp.textContent = "updated " + new Date().toLocaleTimeString();
    start();
  }

  // -- a job's curves ---------------------------------------------------------------------------------

  const W = 360;
  const H = 210;
  const M = { left: 50, right: 12, top: 12, bottom: 30 };
  const MAX_LINE_POINTS = 1500; // a long run logs ~18k steps: the line keeps every k-th one

  function ticks(lo, hi, count) {
    if (hi <= lo) return [lo];
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
    return out;
  }

  // Ticks of a log10 axis from lo to hi (in log10 units): 1, 2 and 5 times powers of ten, or only the
  // powers when that is too many; the two ends when the range holds fewer than two.
  function logTicks(lo, hi) {
    const out = [];
    for (let d = Math.floor(lo); d <= Math.ceil(hi); d++) {
      for (const m of [1, 2, 5]) {
        const v = d + Math.log10(m);
        if (v >= lo && v <= hi) out.push(v);
      }
    }
    if (out.length > 6) return out.filter((v) => Number.isInteger(v));
    return out.length >= 2 ? out : [lo + (hi - lo) * 0.1, hi - (hi - lo) * 0.1];
  }

  // Draws series [{key, points: [[x, y]], dots}] into svg; opts: {xmax, ymin0, log, yfmt, empty}.
  function drawChart(node, series, opts) {
    node.setAttribute("viewBox", "0 0 " + W + " " + H);
    node.replaceChildren();
    const tf = opts.log ? (y) => Math.log10(y) : (y) => y;
    const all = series.flatMap((s) => s.points).filter((p) => isNum(p[1]) && (!opts.log || p[1] > 0));
    const x1 = Math.max(opts.xmax || 0, ...all.map((p) => p[0]), 1);
    let y0 = Math.min(...all.map((p) => tf(p[1])));
    let y1 = Math.max(...all.map((p) => tf(p[1])));
    if (!all.length) {
      y0 = 0;
      y1 = 1;
    }
    if (opts.ymin0 && !opts.log) y0 = Math.min(0, y0);
    if (y1 - y0 < 1e-12) {
      y0 -= opts.log ? 0.5 : Math.abs(y0) * 0.1 || 0.5;
      y1 += opts.log ? 0.5 : Math.abs(y1) * 0.1 || 0.5;
    } else if (!opts.ymin0 || opts.log) {
      const pad = (y1 - y0) * 0.06;
      y0 -= pad;
      y1 += pad;
    } else {
      y1 += (y1 - y0) * 0.06;
    }
    const px = (x) => M.left + (x / x1) * (W - M.left - M.right);
    const py = (y) => H - M.bottom - ((tf(y) - y0) / (y1 - y0)) * (H - M.top - M.bottom);
    const pyRaw = (v) => H - M.bottom - ((v - y0) / (y1 - y0)) * (H - M.top - M.bottom);

    const grid = svg("g", { class: "grid" });
    const yticks = opts.log ? logTicks(y0, y1) : ticks(y0, y1, 4);
    for (const v of yticks) {
      const y = pyRaw(v);
      grid.append(svg("line", { x1: M.left, x2: W - M.right, y1: y, y2: y }));
      const label = opts.log ? lrText(Math.pow(10, v)) : opts.yfmt(v);
      grid.append(svg("text", { x: M.left - 6, y: y + 4, class: "ylabel" }, label));
    }
    for (const v of ticks(0, x1, 5).filter((t) => Number.isInteger(t) || x1 < 5)) {
      const x = px(v);
      grid.append(svg("line", { x1: x, x2: x, y1: M.top, y2: H - M.bottom, class: "xgrid" }));
      grid.append(svg("text", { x: x, y: H - M.bottom + 16, class: "xlabel" }, Number(v.toFixed(2))));
    }
    grid.append(svg("text", { x: W - M.right, y: H - 2, class: "xlabel axis-name" }, "epoch"));
    node.append(grid);

    for (const s of series) {
      const pts = s.points.filter((p) => isNum(p[1]) && (!opts.log || p[1] > 0));
      const every = Math.ceil(pts.length / MAX_LINE_POINTS) || 1;
      const shown = pts.filter((_, i) => i % every === 0 || i === pts.length - 1);
      const coords = shown.map((p) => px(p[0]).toFixed(1) + "," + py(p[1]).toFixed(1)).join(" ");
      node.append(
        svg("polyline", {
          class: "line s-" + s.key,
          "data-series": s.key,
          "data-points": pts.length,
          points: coords,
        }),
      );
      if (s.dots) {
        const g = svg("g", { class: "dots s-" + s.key, "data-series": s.key });
        for (const p of pts) {
          const dot = svg("circle", { class: "pt", cx: px(p[0]).toFixed(1), cy: py(p[1]).toFixed(1), r: 3 });
          dot.append(svg("title", {}, "epoch " + p[0] + ": " + (opts.log ? lrText(p[1]) : opts.yfmt(p[1]))));
          g.append(dot);
        }
        node.append(g);
      }
    }
    if (!all.length) {
      node.append(svg("text", { x: W / 2, y: H / 2, class: "empty" }, opts.empty));
    }
  }

  // -- a job's page -----------------------------------------------------------------------------------

  function initJob(body) {
    const jobId = body.dataset.jobId;
    const base = "/api/v1/jobs/" + encodeURIComponent(jobId);
    const canChange = body.dataset.canChange === "1";
    const epochEvents = new Map(); // epoch number -> its epoch event (a repeated epoch replaces the old)
    const stepLoss = new Map(); // "epoch:step" -> [x, loss]
    let totalEpochs = Number(body.dataset.epochs) || 0;
    let state = body.dataset.state;
    let cancelRequested = body.dataset.cancelRequested === "1";
    let lastId = null;
    let source = null;
    let drawQueued = false;

    function showState(newState, message, cancelFlag) {
      state = newState || state;
      if (cancelFlag !== undefined) cancelRequested = cancelFlag;
      if (TERMINAL.includes(state)) cancelRequested = false;
      const badge = $("state");
      badge.textContent = state;
      badge.className = "badge state-" + state.toLowerCase();
      $("cancel-note").hidden = !cancelRequested;
      if (message !== undefined && message !== null) $("message").textContent = message;
      body.dataset.state = state;
      if (state !== "QUEUED") $("pending").hidden = true;
      if (!canChange) return;
      const cancel = document.querySelector('button[data-action="cancel"]');
      const resume = document.querySelector('button[data-action="resume"]');
      cancel.hidden = TERMINAL.includes(state);
      cancel.disabled = cancelRequested;
      cancel.textContent = cancelRequested ? "Cancel requested" : "Cancel";
      resume.hidden = !(state === "FAILED" || state === "CANCELLED");
      resume.disabled = false;
    }

    function draw() {
      drawQueued = false;
      const epochs = [...epochEvents.values()].sort((a, b) => a.epoch - b.epoch);
      const series = (key) => epochs.filter((e) => isNum(e[key])).map((e) => [e.epoch, e[key]]);
      const steps = [...stepLoss.values()].sort((a, b) => a[0] - b[0]);
      const charts = {};
      for (const node of document.querySelectorAll("svg.chart")) charts[node.dataset.chart] = node;
      const xmax = totalEpochs;
      drawChart(
        charts.loss,
        [
          { key: "step_loss", points: steps, dots: false },
          { key: "train_loss", points: series("train_loss"), dots: true },
        ],
        { xmax, ymin0: true, yfmt: (v) => Number(v.toPrecision(3)), empty: "waiting for the first steps" },
      );
      drawChart(
        charts.error,
        [
          { key: "val_top1_error", points: series("val_top1_error"), dots: true },
          { key: "val_top5_error", points: series("val_top5_error"), dots: true },
        ],
        { xmax, ymin0: true, yfmt: (v) => Math.round(100 * v) + "%", empty: "waiting for the first epoch" },
      );
      drawChart(charts.lr, [{ key: "lr", points: series("lr"), dots: true }], {
        xmax,
        log: true,
        yfmt: lrText,
        empty: "waiting for the first epoch",
      });
    }

    function redraw() {
      if (!drawQueued) {
        drawQueued = true;
        setTimeout(draw, 50); // a replay of many events draws once
      }
    }

    function setBar(id, done) {
      $(id).value = Math.max(0, Math.min(1, done));
    }

    function onStep(ev) {
      if (isNum(ev.epochs)) totalEpochs = ev.epochs;
      const perEpoch = ev.steps_per_epoch;
      const within = isNum(ev.step) && isNum(perEpoch) && perEpoch > 0 ? ev.step / perEpoch : 0;
      $("epoch-text").textContent = ev.epoch + " / " + ev.epochs;
      $("step-text").textContent = ev.step + " / " + perEpoch;
      if (isNum(ev.epochs) && ev.epochs > 0) setBar("epoch-bar", (ev.epoch - 1 + within) / ev.epochs);
      setBar("step-bar", within);
      $("stat-loss").textContent = fmt(ev.loss);
      $("stat-lr").textContent = lrText(ev.lr);
      $("stat-ips").textContent = isNum(ev.images_per_s) ? ev.images_per_s.toFixed(1) : "—";
      if (isNum(ev.loss) && isNum(ev.epoch)) stepLoss.set(ev.epoch + ":" + ev.step, [ev.epoch - 1 + within, ev.loss]);
      redraw();
    }

    function onEpoch(ev) {
      if (isNum(ev.epochs)) totalEpochs = ev.epochs;
      epochEvents.set(ev.epoch, ev);
      $("epoch-text").textContent = ev.epoch + " / " + ev.epochs + " done";
      if (isNum(ev.epochs) && ev.epochs > 0) setBar("epoch-bar", ev.epoch / ev.epochs);
      setBar("step-bar", 1);
      if (isNum(ev.val_top1_error)) $("stat-top1").textContent = pct(ev.val_top1_error);
      if (isNum(ev.val_top5_error)) $("stat-top5").textContent = pct(ev.val_top5_error);
      if (isNum(ev.lr)) $("stat-lr").textContent = lrText(ev.lr);
      redraw();
    }

    function onFinal(ev) {
      $("res-top1").textContent = pct(ev.top1_error);
      $("res-top5").textContent = pct(ev.top5_error);
      $("res-crops").textContent = (ev.ten_crop ? "ten-crop" : "center crop") + ", " + ev.val_samples + " images";
      if (ev.model_url) $("res-model").textContent = ev.model_url;
      setBar("epoch-bar", 1);
    }

    function handle(kind, fn) {
      source.addEventListener(kind, function (msg) {
        if (msg.lastEventId) lastId = msg.lastEventId;
        let ev;
        try {
          ev = JSON.parse(msg.data);
        } catch (_) {
          return;
        }
        fn(ev);
      });
    }

    function follow() {
      const url = base + "/events" + (lastId ? "?after=" + encodeURIComponent(lastId) : "");
      source = new EventSource(url);
      const live = $("live");
      source.onopen = function () {
        live.textContent = "live: following the job’s events";
        live.classList.remove("error");
      };
      handle("state", (ev) => showState(ev.state, ev.message, ev.state === "QUEUED" ? false : undefined));
      handle("step", onStep);
      handle("epoch", onEpoch);
      handle("final", onFinal);
      handle("end", function (ev) {
        source.close();
        showState(ev.state);
        live.textContent = "the job has ended (" + ev.state + ")";
      });
      // an "error" event is either the server's message (Redis went away) or the connection's failure
      source.addEventListener("error", function (msg) {
        live.classList.add("error");
        if (msg.data) {
          try {
            live.textContent = "events interrupted: " + JSON.parse(msg.data).error + "; reconnecting";
          } catch (_) {
            live.textContent = "events interrupted; reconnecting";
          }
        } else if (source.readyState === EventSource.CLOSED) {
          live.textContent = "live updates stopped (logged out or the server refused); reload the page";
        } else {
          live.textContent = "connection lost; reconnecting…";
        }
      });
    }

    // A queued job's place in line changes with every dispatcher pass; its events do not say so.
    async function refreshPending() {
      if (state !== "QUEUED") return;
      try {
        const resp = await fetch(base, { credentials: "same-origin", cache: "no-store" });
        if (!resp.ok) return;
        const rec = await resp.json();
        const p = rec.pending || {};
        const now = Date.now() / 1000;
        const parts = [
          isNum(p.position) ? "#" + p.position + " in line" : "",
          p.reason || "",
          isNum(p.eta_start) ? "starts " + relative(p.eta_start, now) : "",
          isNum(p.eta_finish) ? "ends " + relative(p.eta_finish, now) : "",
        ].filter(Boolean);
        $("pending").textContent = parts.join(" · ");
        $("pending").hidden = rec.state !== "QUEUED" || parts.length === 0;
      } catch (_) {
        // the next poll tries again; the page's other parts say when the server is away
      }
    }

    async function loadLog() {
      const log = $("log");
      log.classList.remove("error");
      log.textContent = "loading…";
      try {
        const resp = await fetch(base + "/logs?tail=50", { credentials: "same-origin", cache: "no-store" });
        if (!resp.ok) throw new Error(await errorOf(resp));
        const text = await resp.text();
        log.textContent = text || "(the log is empty)";
      } catch (err) {
        log.textContent = "logs unavailable: " + err.message;
        log.classList.add("error");
      }
    }

    async function act(action, button) {
      if (action === "cancel" && !window.confirm("Cancel job " + jobId + "?")) return;
      const msg = $("action-msg");
      button.disabled = true;
      msg.textContent = action === "cancel" ? "cancelling…" : "resuming…";
      try {
        const resp = await fetch(base + "/" + action, {
          method: "POST",
          credentials: "same-origin",
          headers: { "X-CSRF-Token": csrf() },
        });
        if (!resp.ok) throw new Error(await errorOf(resp));
        const rec = await resp.json();
        showState(rec.state, rec.message, Boolean(rec.cancel_requested));
        msg.textContent = action === "cancel" ? rec.message : "queued again as attempt " + rec.attempt;
        if (action === "resume" && source && source.readyState === EventSource.CLOSED) follow();
      } catch (err) {
        msg.textContent = action + " refused: " + err.message;
        showState(state);
      }
    }

    if (canChange) {
      for (const button of document.querySelectorAll("button[data-action]")) {
        button.addEventListener("click", () => act(button.dataset.action, button));
      }
    }
    $("log-reload").addEventListener("click", loadLog);
    draw();
    follow();
    loadLog();
    setInterval(refreshPending, PENDING_EVERY_MS);
  }

  // -- start ------------------------------------------------------------------------------------------

  localizeTimes();
  const page = document.body.dataset.page;
  if (page === "queue") initQueue();
  if (page === "job") initJob(document.body);
  if (page === "login") {
    const field = $("token");
    if (field) field.focus();
  }
})();

/* botd console: plain JavaScript, no build step. The chat streams with fetch + ReadableStream
   (one JSON object per line); the status page polls /api/status and draws its charts on canvas. */
(function () {
  "use strict";

  function meta(name) {
    var el = document.querySelector('meta[name="' + name + '"]');
    return el ? el.getAttribute("content") : "";
  }
  var base = meta("console-base");
  var csrf = meta("csrf-token");
  var T = JSON.parse((document.getElementById("texts") || {}).textContent || "{}");

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  function toLogin() {
    window.location.href = base + "/login?expired=1&next=" + encodeURIComponent(location.pathname + location.search);
  }

  function localTime(ts) {
    return new Date(ts * 1000).toLocaleString();
  }

  function localize(root) {
    root.querySelectorAll("[data-ts]").forEach(function (e) {
      var ts = parseFloat(e.getAttribute("data-ts"));
      if (ts) { e.title = e.textContent; e.textContent = localTime(ts); }
    });
  }

  /* Forms that delete something ask first. */
  document.querySelectorAll("form.confirm").forEach(function (f) {
    f.addEventListener("submit", function (ev) {
      if (!window.confirm(f.getAttribute("data-confirm") || T.confirm_delete)) ev.preventDefault();
    });
  });

  /* ---- chat ---------------------------------------------------------------------------- */

  function initChat() {
    var root = document.getElementById("chat");
    if (!root) return;
    var conv = root.getAttribute("data-conversation");
    var log = document.getElementById("log");
    var form = document.getElementById("composer");
    var input = document.getElementById("text");
    var send = document.getElementById("send");
    var bot = document.getElementById("bot");
    var convId = document.getElementById("conv-id");
    var controller = null;

    function newConversation() {
      var bytes = new Uint8Array(4);
      window.crypto.getRandomValues(bytes);
      conv = "c-" + Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
      convId.textContent = conv;
      log.textContent = "";
    }
    document.getElementById("new-conv").addEventListener("click", newConversation);
    bot.addEventListener("change", newConversation);
    input.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        if (form.requestSubmit) form.requestSubmit(); else send.click();
      }
    });

    function bubble(role, who) {
      var m = el("div", "msg " + role);
      m.appendChild(el("div", "meta", who));
      var text = el("div", "text");
      m.appendChild(text);
      log.appendChild(m);
      log.scrollTop = log.scrollHeight;
      return { box: m, text: text };
    }

    function note(b, text) {
      b.box.appendChild(el("div", "note", text));
    }

    function details(b, ev) {
      var d = ev.details || {};
      var box = el("div", "details");
      var parts = [];
      if (d.queue_wait_ms !== undefined) parts.push(T.queue_wait + " " + d.queue_wait_ms + " ms");
      if (d.ttft_ms !== undefined) parts.push(T.ttft + " " + d.ttft_ms + " ms");
      if (d.tokens_per_s) parts.push(d.tokens_per_s + " " + T.tokens_per_s);
      if (d.prompt_tokens !== undefined) parts.push(T.prompt_reused + " " + d.prompt_tokens_reused + "/" + d.prompt_tokens);
      if (d.elapsed_ms !== undefined) parts.push(T.total + " " + (d.elapsed_ms / 1000).toFixed(2) + " s");
      box.appendChild(el("div", "timings", parts.join(" · ")));
      var sources = d.sources && d.sources.length ? d.sources : (ev.sources || []).map(function (c) { return { cite: c }; });
      if (sources.length) {
        box.appendChild(el("div", null, T.sources + ":"));
        var ul = el("ul", "sources");
        sources.forEach(function (s) {
          var line = (s.kb ? "[" + s.kb + "] " : "") + s.cite;
          if (s.similarity !== undefined && s.similarity !== null) line += " (cos " + s.similarity + ")";
          ul.appendChild(el("li", null, line));
        });
        box.appendChild(ul);
      }
      b.box.appendChild(box);
    }

    /* 👍 / 👎 under an answer (its text stays as it is); after a 👎, an optional reason. */
    function feedback(b, answer, conversation) {
      var bar = el("div", "feedback");
      function post(payload) {
        payload.answer = answer;
        payload.conversation = conversation;
        return fetch(base + "/api/feedback", {
          method: "POST", credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf }, body: JSON.stringify(payload)
        }).then(function (r) {
          if (r.status === 401) { toLogin(); throw new Error("login"); }
          if (!r.ok) throw new Error(T.error + " " + r.status);
          return r.json();
        });
      }
      function say(text) {
        var old = bar.querySelector(".fb-note");
        if (old) old.remove();
        bar.appendChild(el("span", "fb-note", text));
      }
      [["up", T.feedback_up], ["down", T.feedback_down]].forEach(function (v) {
        var btn = el("button", "secondary small vote-" + v[0], v[1]);
        btn.type = "button";
        btn.addEventListener("click", function () {
          post({ vote: v[0] }).then(function (res) {
            bar.querySelectorAll("button[class*=vote-]").forEach(function (x) { x.classList.remove("chosen"); });
            btn.classList.add("chosen");
            say(T.feedback_thanks);
            if (res.ask_reason && !bar.querySelector("form")) {
              var f = el("form", "reason");
              var field = el("input");
              field.type = "text";
              field.maxLength = 500;
              field.placeholder = T.feedback_reason;
              var ok = el("button", "secondary small", T.send);
              ok.type = "submit";
              f.appendChild(field);
              f.appendChild(ok);
              f.addEventListener("submit", function (sev) {
                sev.preventDefault();
                if (!field.value.trim()) return;
                post({ vote: null, reason: field.value }).then(function () {
                  f.remove();
                  say(T.feedback_reason_sent);
                }).catch(function (x) { say(x.message); });
              });
              bar.appendChild(f);
            }
          }).catch(function (x) { say(x.message); });
        });
        bar.appendChild(btn);
      });
      b.box.appendChild(bar);
    }

    form.addEventListener("submit", async function (ev) {
      ev.preventDefault();
      if (controller) { controller.abort(); return; }
      var text = input.value;
      var picker = document.getElementById("file");
      var files = picker && picker.files ? Array.prototype.slice.call(picker.files) : [];
      if (!text.trim() && !files.length) return;
      input.value = "";
      // Files go with the message as a form (kept a few minutes for the answer), text alone as JSON.
      var payload = { bot: bot.value, text: text, conversation: conv };
      var body = JSON.stringify(payload), headers = { "Content-Type": "application/json", "X-CSRF-Token": csrf };
      if (files.length) {
        body = new FormData();
        Object.keys(payload).forEach(function (k) { body.append(k, payload[k]); });
        files.forEach(function (f) { body.append("file", f, f.name); });
        headers = { "X-CSRF-Token": csrf };
        picker.value = "";
      }
      bubble("user", T.you).text.textContent = text + files.map(function (f) { return "\n📎 " + f.name; }).join("");
      var b = bubble("assistant streaming", bot.value);
      controller = new AbortController();
      send.textContent = T.stop;
      try {
        var r = await fetch(base + "/api/chat", {
          method: "POST", credentials: "same-origin", signal: controller.signal,
          headers: headers, body: body
        });
        if (r.status === 401) { toLogin(); return; }
        if (!r.ok) {
          var err = await r.json().catch(function () { return null; });
          var msg = err && err.error ? err.error.message : r.statusText;
          note(b, r.status === 503 || r.status === 429 ? T.busy.replace("{msg}", msg) : T.error + " " + r.status + ": " + msg);
          return;
        }
        var reader = r.body.getReader();
        var decoder = new TextDecoder();
        var buf = "";
        for (;;) {
          var chunk = await reader.read();
          if (chunk.done) break;
          buf += decoder.decode(chunk.value, { stream: true });
          var i;
          while ((i = buf.indexOf("\n")) >= 0) {
            var line = buf.slice(0, i);
            buf = buf.slice(i + 1);
            if (!line.trim()) continue;
            var e = JSON.parse(line);
            if (e.done) {
              if (!e.complete) note(b, T.error + ": " + (e.error || e.finish));
              else if (e.finish === "length") note(b, T.cut);
              details(b, e);
              if (e.feedback) feedback(b, e.feedback, conv);
            } else if (e.notice) {
              // Waiting for the model: the place in line, replaced by the answer's first words.
              b.text.textContent = e.notice;
              b.waiting = true;
            } else if (e.delta) {
              if (b.waiting) { b.text.textContent = ""; b.waiting = false; }
              b.text.textContent += e.delta;
              log.scrollTop = log.scrollHeight;
            }
          }
        }
      } catch (x) {
        if (x.name !== "AbortError") note(b, T.error + ": " + x.message);
      } finally {
        b.box.classList.remove("streaming");
        controller = null;
        send.textContent = T.send;
        input.focus();
      }
    });
  }

  /* ---- status ---------------------------------------------------------------------------- */

  function chart(canvas, lines, opts) {
    opts = opts || {};
    var dpr = window.devicePixelRatio || 1;
    var w = canvas.clientWidth || 600, h = canvas.clientHeight || 160;
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
    var g = canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    g.font = "11px system-ui, sans-serif";
    var left = 40, right = 8, top = 8, bottom = 20;
    var pw = w - left - right, ph = h - top - bottom;
    var now = opts.now || Date.now() / 1000, span = 3600;
    var max = opts.max || 0;
    lines.forEach(function (l) { l.points.forEach(function (p) { if (p[1] !== null && p[1] > max) max = p[1]; }); });
    if (!opts.max) max = max > 0 ? max * 1.15 : 1;
    /* grid and labels */
    g.strokeStyle = "#e3e6eb"; g.fillStyle = "#667085"; g.lineWidth = 1;
    for (var k = 0; k <= 4; k++) {
      var y = top + ph - (ph * k) / 4;
      g.beginPath(); g.moveTo(left, y + 0.5); g.lineTo(left + pw, y + 0.5); g.stroke();
      var v = (max * k) / 4;
      var label = opts.percent ? Math.round(v * 100) + "%" : (v >= 10 ? Math.round(v) : v.toFixed(1));
      g.textAlign = "right"; g.fillText(label, left - 6, y + 4);
    }
    g.textAlign = "center";
    (pw < 400 ? [60, 30, 0] : [60, 45, 30, 15, 0]).forEach(function (m) {
      var x = left + pw * (1 - m / 60);
      g.fillText(m ? "-" + m + " " + T.minutes : T.now, Math.min(Math.max(x, left + 20), left + pw - 14), h - 5);
    });
    var any = false;
    lines.forEach(function (l) {
      g.strokeStyle = l.color; g.fillStyle = l.color; g.lineWidth = 2;
      g.beginPath();
      var started = false;
      l.points.forEach(function (p) {
        if (p[1] === null) { started = false; return; }
        var x = left + pw * (1 - (now - p[0]) / span);
        var y2 = top + ph - (ph * Math.min(p[1], max)) / max;
        if (x < left) return;
        any = true;
        if (!started) { g.moveTo(x, y2); started = true; } else { g.lineTo(x, y2); }
        g.fillRect(x - 1.5, y2 - 1.5, 3, 3);
      });
      g.stroke();
    });
    if (!any) {
      g.fillStyle = "#667085"; g.textAlign = "center"; g.font = "13px system-ui, sans-serif";
      g.fillText(T.no_data, left + pw / 2, top + ph / 2);
    }
    if (lines.length > 1) {
      var lx = left + 8;
      g.textAlign = "left"; g.font = "11px system-ui, sans-serif";
      lines.forEach(function (l) {
        g.fillStyle = l.color; g.fillRect(lx, top + 4, 10, 3);
        g.fillStyle = "#1d2330"; g.fillText(l.label, lx + 14, top + 9);
        lx += g.measureText(l.label).width + 30;
      });
    }
  }

  function setText(id, text) {
    var e = document.getElementById(id);
    if (e) e.textContent = text;
  }

  function duration(s) {
    s = Math.floor(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function renderStatus(s) {
    setText("s-loaded", s.model.loaded ? T.loaded : T.not_loaded);
    setText("s-uptime", duration(s.uptime_s));
    setText("s-depth", s.queue.depth + " / " + s.queue.capacity);
    setText("s-active", s.queue.active_sequences + " / " + s.queue.slots);
    setText("s-generating", s.queue.generating ? T.generating : T.idle);
    var redis = document.getElementById("s-redis");
    redis.textContent = s.redis.status === "ok" ? T.ok : T.unreachable;
    redis.className = s.redis.status === "ok" ? "ok" : "bad";
    setText("s-redis-error", s.redis.error || "");
    var kb = document.getElementById("s-knowledge");
    kb.textContent = "";
    var names = Object.keys(s.knowledge);
    if (!names.length) kb.appendChild(el("li", "muted", T.none));
    names.forEach(function (n) {
      var li = el("li", null, n + ": ");
      var st = s.knowledge[n];
      li.appendChild(el("span", "badge " + st, T["state_" + st] || st));
      kb.appendChild(li);
    });
    var tbody = document.getElementById("s-connectors");
    tbody.textContent = "";
    s.connectors.forEach(function (c) {
      var tr = el("tr");
      [c.name, c.platform, String(c.events), c.last_event ? localTime(c.last_event) : T.never, String(c.errors),
        c.last_error ? localTime(c.last_error) : T.never].forEach(function (v) { tr.appendChild(el("td", null, v)); });
      tbody.appendChild(tr);
    });
    var errs = document.getElementById("s-errors");
    if (errs) {
      errs.textContent = "";
      if (!s.recent_errors.length) errs.appendChild(el("li", "muted", T.none));
      s.recent_errors.forEach(function (e) { errs.appendChild(el("li", null, localTime(e.t) + " " + e.what)); });
    }
    var series = s.last_hour.series;
    var mid = s.last_hour.bucket_s / 2;
    function pts(key) { return series.map(function (p) { return [p.t + mid, p[key]]; }); }
    chart(document.getElementById("chart-tps"), [{ points: pts("tokens_per_s"), color: "#2463eb", label: T.tokens_per_s }], { now: s.now });
    chart(document.getElementById("chart-cache"), [{ points: pts("cache_hit_ratio"), color: "#138a4b", label: "" }], { now: s.now, max: 1, percent: true });
    chart(document.getElementById("chart-queue"), [
      { points: pts("queue_depth"), color: "#b7791f", label: T.depth },
      { points: pts("active_sequences"), color: "#7c3aed", label: T.active }
    ], { now: s.now });
  }

  function initStatus() {
    var root = document.getElementById("status");
    if (!root) return;
    var last = JSON.parse(root.getAttribute("data-initial"));
    renderStatus(last);
    window.addEventListener("resize", function () { renderStatus(last); });
    setInterval(async function () {
      if (document.hidden) return;
      try {
        var r = await fetch(base + "/api/status", { credentials: "same-origin" });
        if (r.status === 401) { toLogin(); return; }
        if (r.ok) { last = await r.json(); renderStatus(last); }
      } catch (x) { /* the daemon may be restarting: try again at the next tick */ }
    }, 5000);
  }

  /* ---- knowledge: refresh while an ingest runs ------------------------------------------------ */

  function initKnowledge() {
    var root = document.getElementById("knowledge");
    if (!root || root.getAttribute("data-live") !== "1") return;
    // An ingest runs: show its time going up, and reload the page (documents, chunk counts,
    // the run's summary) once it is over.
    var timer = setInterval(async function () {
      try {
        var r = await fetch(base + "/api/knowledge", { credentials: "same-origin" });
        if (r.status === 401) { toLogin(); return; }
        if (!r.ok) return;
        var running = false;
        (await r.json()).knowledge.forEach(function (kb) {
          var p = kb.progress;
          if (p && p.running) running = true;
          var line = root.querySelector('.progress-line[data-kb="' + kb.name + '"] .elapsed');
          if (line && p) line.textContent = p.elapsed_s;
        });
        if (!running) {
          clearInterval(timer);
          var u = new URL(window.location.href);
          u.searchParams.delete("notice");
          window.location.replace(u.toString());
        }
      } catch (x) { /* try again at the next tick */ }
    }, 1000);
  }

  localize(document);
  initChat();
  initStatus();
  initKnowledge();
})();

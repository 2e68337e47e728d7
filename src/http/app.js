// tinyci's pages, brought up to date over Server-Sent Events. Everything from the server
// goes in as text (textContent), except log lines, which the server renders and escapes.
"use strict";

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function badge(status) {
  return el("span", "st " + status, status);
}

// The run list at `/`: one `run` event per run that changed, newest last.
function liveList() {
  const body = document.getElementById("runs");
  if (!body) return;
  const es = new EventSource("/events");
  es.addEventListener("run", (e) => {
    const r = JSON.parse(e.data);
    const row = el("tr");
    row.id = "run-" + r.id;
    row.dataset.status = r.status;
    const link = el("a");
    link.href = "/run/" + r.id;
    link.appendChild(el("code", null, r.id.slice(0, 12)));
    const cells = [el("td", "id"), el("td"), el("td", "branch", r.branch || ""),
      el("td", "when", "just now"), el("td", "failed", (r.failed_steps || []).join(", "))];
    cells[0].appendChild(link);
    cells[1].appendChild(badge(r.status));
    cells[3].title = r.queued_at;
    cells.forEach((c) => row.appendChild(c));
    const old = document.getElementById(row.id);
    if (old) {
      cells[3].textContent = old.querySelector(".when").textContent;
      old.replaceWith(row);
    } else {
      body.insertBefore(row, body.firstChild);
      const empty = document.getElementById("empty");
      if (empty) empty.remove();
    }
  });
}

// A run's page: its status and new log lines as they come, from where the page ended.
function liveRun() {
  const main = document.getElementById("run");
  if (!main) return;
  const log = document.getElementById("log");
  const follow = document.getElementById("follow");
  document.getElementById("followbox").hidden = false;
  const status = document.getElementById("status");
  const setStatus = (s) => { status.className = "st " + s; status.textContent = s; main.dataset.status = s; };
  let next = Number(main.dataset.nextLine);
  const finished = ["success", "failure", "error", "cancelled"];
  if (finished.includes(main.dataset.status)) return;
  const sha = main.dataset.sha;
  const es = new EventSource("/events?html=1&run=" + sha + "&offset=" + main.dataset.offset);
  es.addEventListener("log", (e) => {
    const d = JSON.parse(e.data);
    const frag = document.createDocumentFragment();
    d.html.forEach((h) => {
      const line = el("div", "line");
      line.id = "L" + next;
      const a = el("a", "ln", String(next));
      a.href = "#L" + next;
      const code = el("code");
      code.innerHTML = h; // rendered and escaped by the server
      line.appendChild(a);
      line.appendChild(code);
      frag.appendChild(line);
      next += 1;
    });
    log.appendChild(frag);
    if (follow.checked) log.lastElementChild.scrollIntoView({ block: "end" });
  });
  es.addEventListener("status", (e) => setStatus(JSON.parse(e.data).status));
  es.addEventListener("end", (e) => {
    es.close();
    setStatus(JSON.parse(e.data).status);
    fetch("/run/" + sha, { headers: { Accept: "application/json" } })
      .then((r) => r.json())
      .then((d) => {
        const tbody = document.querySelector("#steps tbody");
        tbody.textContent = "";
        d.steps.forEach((s) => {
          const tr = el("tr");
          const st = el("td");
          st.appendChild(badge(s.status));
          [el("td", null, s.name), st, el("td", null, s.exit_code === null ? "" : String(s.exit_code)),
            el("td", null, (s.duration_ms / 1000).toFixed(1) + "s")].forEach((c) => tr.appendChild(c));
          tbody.appendChild(tr);
        });
      })
      .catch(() => {});
  });
}

liveList();
liveRun();

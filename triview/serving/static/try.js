// The try page: sends each photo to POST <prefix>/api/predict and shows the answer.
// Labels at a moved threshold are worked out here from the probabilities the server sent,
// by the rule of triview.predict.Predictor.labels (best first, ties by class order; a
// single-label model always lists its best class). No data is written into the page as
// HTML: everything goes through textContent and attributes.
"use strict";

(function () {
  const app = document.getElementById("app");
  const prefix = app.dataset.prefix;
  const limits = JSON.parse(app.dataset.limits);
  const el = (id) => document.getElementById(id);
  const modelSelect = el("model"), slider = el("threshold"), tuned = el("tuned");
  const results = el("results"), counts = el("counts").querySelector("tbody");
  const SVG = "http://www.w3.org/2000/svg";
  const DASHES = ["", "8 4", "2 3"];   // each view is told apart by more than its colour

  let info = null;        // the chosen model: classes, views, task, thresholds
  let photos = [];        // {id, file, url, state: pending|ok|error, answer, error, card}
  let nextId = 0;

  function make(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(score) { return score.toFixed(3); }
  function round6(x) { return Number(x.toFixed(6)); }

  // ------------------------------------------------------------------ thresholds and labels

  function cuts() {
    if (tuned.checked) return info.thresholds;
    const t = Number(slider.value);
    return info.classes.map(() => t);
  }

  function labelsOf(prob, cut) {
    const order = prob.map((_, i) => i).sort((a, b) => (prob[b] - prob[a]) || (a - b));
    let keep = order.filter((k) => prob[k] >= cut[k]);
    if (info.task !== "multilabel" && !keep.includes(order[0])) keep = [order[0]].concat(keep);
    return keep.map((k) => ({ label: info.classes[k], score: prob[k] }));
  }

  // ------------------------------------------------------------------ model

  async function chooseModel() {
    const status = el("model-status");
    status.textContent = "Loading the model…";
    status.classList.remove("error");
    info = null;
    try {
      const response = await fetch(`${prefix}/api/models/${encodeURIComponent(modelSelect.value)}`);
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
      info = body;
    } catch (err) {
      status.textContent = `This model could not be loaded: ${err.message}. Pick another one.`;
      status.classList.add("error");
      status.setAttribute("role", "alert");
      render();
      return;
    }
    status.setAttribute("role", "status");
    status.textContent = `${info.name}: ${info.task === "multilabel" ? "multi-label" : "single-label"}, ` +
      `classes ${info.classes.join(", ")}; views ${info.views.join(", ")}.`;
    const uniform = info.thresholds.every((t) => t === info.thresholds[0]);
    el("tuned-detail").textContent = uniform ? `(${info.thresholds[0]} for every class)`
      : "(tuned per label on validation)";
    const again = photos.filter((p) => !p.tooLarge);
    for (const photo of again) photo.state = "pending";
    render();
    send(again);
  }

  // ------------------------------------------------------------------ photos

  function addFiles(files) {
    const added = [];
    for (const file of files) {
      const photo = { id: nextId++, file, url: URL.createObjectURL(file), state: "pending" };
      if (file.size > limits.max_body_bytes) {   // the server would refuse it (413)
        photo.state = "error";
        photo.tooLarge = true;
        photo.error = `${(file.size / 2 ** 20).toFixed(1)} MB is larger than this server ` +
          `accepts (${(limits.max_body_bytes / 2 ** 20).toFixed(0)} MB per photo)`;
      } else {
        added.push(photo);
      }
      photos.push(photo);
    }
    render();
    send(added);
  }

  async function predictOne(photo, modelId) {
    let response;
    try {
      response = await fetch(`${prefix}/api/predict?model=${encodeURIComponent(modelId)}`, {
        method: "POST", body: photo.file, headers: { "Content-Type": "application/octet-stream" },
      });
    } catch (err) {
      return { error: "the server did not answer (is it still running?)" };
    }
    if (response.status === 413) {
      return { error: "larger than this server accepts" };
    }
    let body;
    try { body = await response.json(); } catch (err) { body = {}; }
    if (!response.ok) return { error: body.error || `HTTP ${response.status}` };
    return { answer: body };
  }

  async function send(queue) {
    if (!info || !queue.length) return;
    const modelId = info.id;
    let done = 0;
    const progress = el("progress");
    progress.textContent = `Sending ${queue.length} photo${queue.length > 1 ? "s" : ""}…`;
    async function worker() {
      while (queue.length) {
        const photo = queue.shift();
        const got = await predictOne(photo, modelId);
        if (!info || info.id !== modelId || !photos.includes(photo)) continue;  // superseded
        photo.state = got.error ? "error" : "ok";
        photo.error = got.error;
        photo.answer = got.answer;
        done += 1;
        renderPhoto(photo);
        renderSummary();
      }
    }
    await Promise.all(Array.from({ length: limits.parallel }, worker));
    const failed = photos.filter((p) => p.state === "error").length;
    progress.textContent = `${done} answered` + (failed ? `, ${failed} could not be read` : "") + ".";
  }

  // ------------------------------------------------------------------ rendering

  function boxes(photo) {
    const { width, height, views } = photo.answer;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("aria-hidden", "true");
    const stroke = Math.max(2, Math.round(Math.min(width, height) / 150));
    views.forEach((view, k) => {
      const [x0, y0, x1, y1] = view.box;
      const inset = stroke * (k + 0.5);   // nested boxes stay apart
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", x0 + inset);
      rect.setAttribute("y", y0 + inset);
      rect.setAttribute("width", Math.max(1, x1 - x0 - 2 * inset));
      rect.setAttribute("height", Math.max(1, y1 - y0 - 2 * inset));
      rect.setAttribute("class", `box view-${k}`);
      rect.setAttribute("stroke-width", stroke);
      if (DASHES[k]) rect.setAttribute("stroke-dasharray", DASHES[k].split(" ").map((d) => d * stroke).join(" "));
      svg.appendChild(rect);
    });
    return svg;
  }

  function renderPhoto(photo) {
    const card = photo.card || make("article", { class: "result" });
    photo.card = card;
    card.replaceChildren();
    card.dataset.name = photo.file.name;
    card.dataset.state = photo.state;
    card.appendChild(make("h3", {}, photo.file.name));
    const figure = make("div", { class: "photo" });
    const img = make("img", { src: photo.url, alt: `${photo.file.name}` +
      (photo.state === "ok" && photo.answer.views ? ", with the crop of each view marked" : "") });
    figure.appendChild(img);
    if (photo.state === "ok" && photo.answer.views) figure.appendChild(boxes(photo));
    card.appendChild(figure);
    if (photo.state === "pending") {
      card.appendChild(make("p", { class: "status" }, "Waiting for the answer…"));
    } else if (photo.state === "error") {
      card.appendChild(make("p", { class: "error", role: "alert" }, `Not predicted: ${photo.error}`));
    } else {
      const labels = labelsOf(photo.answer.probabilities, cuts());
      card.appendChild(make("h4", {}, "Labels"));
      const list = make("ul", { class: "labels" });
      for (const { label, score } of labels) {
        const item = make("li", { "data-label": label, "data-score": String(score) });
        item.appendChild(make("span", { class: "label" }, label));
        item.appendChild(make("span", { class: "score" }, fmt(score)));
        list.appendChild(item);
      }
      if (!labels.length) list.appendChild(make("li", { class: "none" }, "no label at this threshold"));
      card.appendChild(list);
      if (photo.answer.views) {
        card.appendChild(make("h4", {}, "What each view saw"));
        const views = make("ol", { class: "views" });
        photo.answer.views.forEach((view, k) => {
          const item = make("li", { class: `view view-${k}`, "data-view": view.name,
            "data-label": view.top.label, "data-score": String(view.top.score) });
          item.appendChild(make("span", { class: "swatch", "aria-hidden": "true" }));
          item.appendChild(make("span", { class: "view-name" }, `${view.name}: `));
          item.appendChild(make("span", { class: "label" }, view.top.label));
          item.appendChild(make("span", { class: "score" }, fmt(view.top.score)));
          views.appendChild(item);
        });
        card.appendChild(views);
      } else {
        card.appendChild(make("p", { class: "help" }, "This model has no per-view outputs: " +
          "its voter reads one view only, or it was exported before them (export it again " +
          "to see what each view saw)."));
      }
    }
    if (!card.parentNode) results.appendChild(card);
  }

  function answers() {
    return photos.filter((p) => p.state !== "pending").map((p) => {
      const row = { path: p.file.name };
      if (p.state === "error") return Object.assign(row, { labels: [], error: p.error });
      row.labels = labelsOf(p.answer.probabilities, cuts())
        .map(({ label, score }) => ({ label, score: round6(score) }));
      if (p.answer.views) {
        row.views = {};
        for (const v of p.answer.views) row.views[v.name] = { label: v.top.label, score: v.top.score };
      }
      return row;
    });
  }

  function renderSummary() {
    counts.replaceChildren();
    const ok = answers().filter((a) => !a.error);
    if (info) {
      const tally = new Map(info.classes.map((c) => [c, 0]));
      for (const a of ok) {
        const counted = info.task === "multilabel" ? a.labels.map((l) => l.label) : a.labels.slice(0, 1).map((l) => l.label);
        for (const label of counted) tally.set(label, tally.get(label) + 1);
      }
      for (const [label, n] of tally) {
        const row = make("tr", { "data-class": label, "data-count": String(n) });
        row.appendChild(make("th", { scope: "row" }, label));
        row.appendChild(make("td", {}, String(n)));
        counts.appendChild(row);
      }
    }
    const any = photos.length > 0;
    el("download-csv").disabled = el("download-json").disabled = !answers().length;
    el("clear").disabled = !any;
  }

  function render() {
    for (const photo of photos) renderPhoto(photo);
    renderSummary();
  }

  // ------------------------------------------------------------------ downloads

  function download(name, type, text) {
    const link = make("a", { href: URL.createObjectURL(new Blob([text], { type })), download: name });
    document.body.appendChild(link);
    link.click();
    link.remove();
  }

  function csvCell(value) {
    const text = String(value === undefined || value === null ? "" : value);
    return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function asCsv() {
    const views = info ? info.views : [];
    const head = ["path", "labels", "scores"].concat(...views.map((v) => [`${v}_label`, `${v}_score`]), ["error"]);
    const lines = [head.join(",")];
    for (const a of answers()) {
      const cells = [a.path, a.labels.map((l) => l.label).join(";"), a.labels.map((l) => l.score).join(";")];
      for (const v of views) {
        const top = a.views && a.views[v];
        cells.push(top ? top.label : "", top ? top.score : "");
      }
      cells.push(a.error || "");
      lines.push(cells.map(csvCell).join(","));
    }
    return lines.join("\n") + "\n";
  }

  // ------------------------------------------------------------------ wiring

  slider.addEventListener("input", () => {
    el("threshold-value").textContent = Number(slider.value).toFixed(2);
    tuned.checked = false;
    render();
  });
  tuned.addEventListener("change", render);
  modelSelect.addEventListener("change", chooseModel);
  el("files").addEventListener("change", (event) => {
    addFiles(Array.from(event.target.files));
    event.target.value = "";
  });
  const drop = el("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addFiles(Array.from(event.dataTransfer.files));
  });
  el("download-json").addEventListener("click", () =>
    download("answers.json", "application/json", JSON.stringify(answers(), null, 2) + "\n"));
  el("download-csv").addEventListener("click", () => download("answers.csv", "text/csv", asCsv()));
  el("clear").addEventListener("click", () => {
    for (const p of photos) URL.revokeObjectURL(p.url);
    photos = [];
    results.replaceChildren();
    el("progress").textContent = "";
    renderSummary();
  });

  chooseModel();
})();

// The terdit-edge web page: plain JavaScript, no external resources. Talks to the /v1 job API.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  let key = sessionStorage.getItem("terdit-key") || "";
  let classes = [];

  function headers(json) {
    const h = {};
    if (key) h["Authorization"] = "Bearer " + key;
    if (json) h["Content-Type"] = "application/json";
    return h;
  }

  async function api(path, options) {
    const r = await fetch(path, Object.assign({ headers: headers(options && options.body) }, options || {}));
    if (r.status === 401) {
      // say why next to the key field: a wrong key must not look like nothing happened
      const msg = key ? "the server refused this key (" + (await errorText(r)) + ")" : "this server needs an API key";
      $("key-panel").hidden = false;
      $("key-error").textContent = msg;
      throw new Error(msg);
    }
    $("key-error").textContent = "";
    return r;
  }

  async function errorText(r) {
    try { const j = await r.json(); return j.error ? j.error.message : r.statusText; }
    catch (e) { return r.status + " " + r.statusText; }
  }

  async function loadCapabilities() {
    let r;
    try { r = await api("/v1/capabilities"); }
    catch (e) { $("model-info").textContent = e.message; return; }
    if (r.status === 503) { $("model-info").textContent = "model loading…"; setTimeout(loadCapabilities, 500); return; }
    if (!r.ok) { $("model-info").textContent = await errorText(r); return; }
    const caps = await r.json();
    $("key-panel").hidden = true;
    classes = caps.classes;
    $("model-info").textContent = `${caps.model} · ${caps.classes.length} classes · ${caps.image.width}x${caps.image.height}` +
      ` · ${caps.backend} · batch ${caps.limits.max_batch}`;
    const sel = $("sampler");
    sel.textContent = "";
    for (const s of caps.samplers) { const o = document.createElement("option"); o.value = s; o.textContent = s; sel.appendChild(o); }
    sel.value = "ddim";
    $("steps").max = caps.limits.max_steps;
    $("n").max = caps.limits.max_n;
    renderClassList();
    const canEdit = caps.edit && caps.edit.available;
    $("mode-edit").disabled = !canEdit;
    $("mode-edit").parentElement.title = canEdit ? "" : (caps.edit ? caps.edit.reason : "this server cannot edit");
    if (!canEdit && editMode()) { $("mode-generate").checked = true; setMode(); }
    $("generate").disabled = false;
  }

  function renderClassList() {
    const q = $("class-search").value.trim().toLowerCase();
    const list = $("class-list");
    list.textContent = "";
    const hits = classes.filter((c) => !q || c.name.toLowerCase().includes(q) || String(c.id) === q);
    hits.sort((a, b) => (b.name.toLowerCase() === q) - (a.name.toLowerCase() === q));
    for (const c of hits.slice(0, 200)) {
      const li = document.createElement("li");
      li.className = "class-option";
      li.dataset.id = c.id;
      li.setAttribute("role", "option");
      li.textContent = `${c.name} (${c.id})`;
      if ($("class-selected").dataset.id === String(c.id)) li.classList.add("chosen");
      li.addEventListener("click", () => choose(c));
      list.appendChild(li);
    }
  }

  function choose(c) {
    const s = $("class-selected");
    s.dataset.id = c.id;
    s.textContent = `${c.name} (${c.id})`;
    renderClassList();
  }

  function className(id) { const c = classes.find((x) => x.id === id); return c ? c.name : String(id); }

  // -- edit mode: a picture, and a mask painted over it (white = regenerate) ------------------------
  const edit = { picture: null, dataUrl: "", mask: null, overlay: null, painted: false, drawing: false, last: null };

  function editMode() { return $("mode-edit").checked; }

  function setMode() {
    const on = editMode();
    $("edit-panel").hidden = !on;
    $("generate").textContent = on ? "Edit" : "Generate";
  }

  function redraw() {
    const c = $("edit-canvas");
    const g = c.getContext("2d");
    g.clearRect(0, 0, c.width, c.height);
    if (!edit.picture) return;
    g.globalAlpha = 1;
    g.drawImage(edit.picture, 0, 0);
    g.globalAlpha = 0.5;
    g.drawImage(edit.overlay, 0, 0);
    g.globalAlpha = 1;
  }

  function clearMask() {
    if (!edit.picture) return;
    const m = edit.mask.getContext("2d");
    m.fillStyle = "#000";
    m.fillRect(0, 0, edit.mask.width, edit.mask.height);
    edit.overlay.getContext("2d").clearRect(0, 0, edit.overlay.width, edit.overlay.height);
    edit.painted = false;
    $("mask-state").textContent = "no mask: the whole picture is edited";
    redraw();
  }

  function loadPicture(file) {
    $("form-error").textContent = "";
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      const img = new Image();
      img.onload = () => {
        edit.picture = img;
        edit.dataUrl = reader.result;
        const c = $("edit-canvas");
        c.width = img.naturalWidth;
        c.height = img.naturalHeight;
        c.classList.remove("empty");
        for (const k of ["mask", "overlay"]) {
          edit[k] = document.createElement("canvas");
          edit[k].width = img.naturalWidth;
          edit[k].height = img.naturalHeight;
        }
        $("brush").value = String(Math.max(1, Math.round(Math.min(img.naturalWidth, img.naturalHeight) / 8)));
        clearMask();
      };
      img.onerror = () => { $("form-error").textContent = "this file is not a picture the browser can show"; };
      img.src = reader.result;
    };
    reader.readAsDataURL(file);
  }

  function canvasPoint(ev) {
    const c = $("edit-canvas");
    const r = c.getBoundingClientRect();
    return [(ev.clientX - r.left) * c.width / r.width, (ev.clientY - r.top) * c.height / r.height];
  }

  function paint(from, to) {
    const w = Math.max(1, Number($("brush").value) || 1);
    for (const [cv, colour] of [[edit.mask, "#fff"], [edit.overlay, "#f00"]]) {
      const g = cv.getContext("2d");
      g.strokeStyle = colour;
      g.fillStyle = colour;
      g.lineWidth = w;
      g.lineCap = "round";
      g.beginPath();
      g.moveTo(from[0], from[1]);
      g.lineTo(to[0], to[1]);
      g.stroke();
      g.beginPath();
      g.arc(to[0], to[1], w / 2, 0, 2 * Math.PI);
      g.fill();
    }
    edit.painted = true;
    $("mask-state").textContent = "mask painted: only the red region is regenerated";
    redraw();
  }

  function editBody(body) {
    if (!edit.picture) throw new Error("upload a picture to edit first");
    body.image = edit.dataUrl;
    body.strength = Number($("strength").value);
    if (edit.painted) body.mask = edit.mask.toDataURL("image/png");
    return body;
  }

  async function submit(ev) {
    ev.preventDefault();
    $("form-error").textContent = "";
    let cls = $("class-selected").dataset.id;
    if (cls === "") {
      const first = document.querySelector("#class-list .class-option");
      if (!first || !$("class-search").value.trim()) { $("form-error").textContent = "pick a class first"; return; }
      cls = first.dataset.id;
      choose(classes.find((c) => String(c.id) === cls));
    }
    const body = { class: Number(cls), sampler: $("sampler").value, n: Number($("n").value || 1) };
    const steps = $("steps").value.trim();
    if (steps) body.steps = Number(steps);
    const cfg = $("cfg").value.trim();
    if (cfg) body.cfg_scale = Number(cfg);
    const seed = $("seed").value.trim();
    if (seed) body.seed = Number(seed);
    if (editMode()) {
      try { editBody(body); }
      catch (e) { $("form-error").textContent = e.message; return; }
    }
    let r;
    try { r = await api("/v1/jobs", { method: "POST", body: JSON.stringify(body) }); }
    catch (e) { $("form-error").textContent = e.message; return; }
    if (r.status !== 202) { $("form-error").textContent = await errorText(r); return; }
    const job = await r.json();
    follow(job, body);
  }

  function jobCard(job, body) {
    const card = document.createElement("div");
    card.className = "job";
    card.id = "job-" + job.id;
    card.dataset.jobId = job.id;
    const preview = document.createElement("img");
    preview.className = "preview";
    preview.alt = "preview";
    const bar = document.createElement("progress");
    bar.className = "bar";
    bar.setAttribute("max", "1");
    bar.setAttribute("value", "0");
    const label = document.createElement("span");
    label.className = "label";
    const what = body.image ? (body.mask ? `inpainting, strength ${body.strength}` : `edit, strength ${body.strength}`) : "";
    label.textContent = `${className(body.class)} ×${body.n}, seeds ${job.seeds[0]}…, ${body.sampler}` +
      (what ? `, ${what}` : "");
    const status = document.createElement("span");
    status.className = "status";
    status.textContent = "queued";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "cancel";
    cancel.textContent = "Cancel";
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      const rr = await api(`/v1/jobs/${job.id}/cancel`, { method: "POST" });
      if (!rr.ok && rr.status !== 202) status.textContent = await errorText(rr);
    });
    card.append(preview, bar, label, status, cancel);
    $("jobs").prepend(card);
    return { card, preview, bar, status, cancel };
  }

  async function follow(job, body) {
    const ui = jobCard(job, body);
    const r = await api(`/v1/jobs/${job.id}/events`);
    if (!r.ok) { ui.status.textContent = await errorText(r); return; }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let name = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) name = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (data) await handle(job, body, ui, name, JSON.parse(data));
      }
    }
  }

  async function handle(job, body, ui, name, d) {
    if (name === "queued") ui.status.textContent = `queued (position ${d.queue_position})`;
    else if (name === "started") ui.status.textContent = `running (batch of ${d.batch_images})`;
    else if (name === "step") {
      ui.bar.setAttribute("max", String(d.steps));
      ui.bar.setAttribute("value", String(d.step));
      ui.status.textContent = `running: step ${d.step}/${d.steps}` +
        (d.eta_seconds != null ? `, ${d.eta_seconds.toFixed(1)} s left` : "");
      if (d.preview) ui.preview.src = d.preview;
    } else if (name === "cancelled") {
      ui.status.textContent = `cancelled at step ${d.step}`;
      ui.card.classList.add("cancelled");
      ui.cancel.disabled = true;
    } else if (name === "error") {
      ui.status.textContent = "failed: " + d.error;
      ui.card.classList.add("failed");
      ui.cancel.disabled = true;
    } else if (name === "done") {
      ui.bar.setAttribute("value", ui.bar.getAttribute("max"));
      ui.status.textContent = "done";
      ui.card.classList.add("done");
      ui.cancel.disabled = true;
      const info = await (await api(`/v1/jobs/${job.id}`)).json();
      for (let k = 0; k < info.images.length; k++) await addToGallery(info, k);
    }
  }

  async function addToGallery(info, k) {
    const r = await api(info.images[k]);
    if (!r.ok) return;
    const url = URL.createObjectURL(await r.blob());
    const fig = document.createElement("figure");
    fig.className = "result";
    const img = document.createElement("img");
    img.src = url;
    img.alt = `class ${className(info.classes[k])}, seed ${info.seeds[k]}`;
    const cap = document.createElement("figcaption");
    cap.textContent = `${className(info.classes[k])} · seed ${info.seeds[k]} · ${info.sampler} ${info.steps_spec} steps · cfg ${info.cfg_scale} ` +
      (info.edit ? `· ${info.edit.mode} strength ${info.edit.strength} ` : "");
    if (info.edit) fig.classList.add("edited");
    const a = document.createElement("a");
    a.href = url;
    a.download = `${info.id}-${k}.png`;
    a.className = "download";
    a.textContent = "download";
    cap.appendChild(a);
    fig.append(img, cap);
    $("gallery").prepend(fig);
  }

  $("class-search").addEventListener("input", renderClassList);
  $("class-search").addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      const first = document.querySelector("#class-list .class-option");
      if (first) first.click();
    }
  });
  $("form").addEventListener("submit", submit);
  for (const id of ["mode-generate", "mode-edit"]) $(id).addEventListener("change", setMode);
  $("edit-file").addEventListener("change", (e) => loadPicture(e.target.files[0]));
  $("mask-clear").addEventListener("click", clearMask);
  $("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
  const canvas = $("edit-canvas");
  canvas.classList.add("empty");
  canvas.addEventListener("pointerdown", (e) => {
    if (!edit.picture) return;
    e.preventDefault();
    canvas.setPointerCapture(e.pointerId);
    edit.drawing = true;
    edit.last = canvasPoint(e);
    paint(edit.last, edit.last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!edit.drawing) return;
    const p = canvasPoint(e);
    paint(edit.last, p);
    edit.last = p;
  });
  for (const name of ["pointerup", "pointercancel", "pointerleave"]) {
    canvas.addEventListener(name, () => { edit.drawing = false; });
  }
  setMode();
  $("key-save").addEventListener("click", () => {
    key = $("api-key").value.trim();
    sessionStorage.setItem("terdit-key", key);
    loadCapabilities();
  });
  loadCapabilities();
})();

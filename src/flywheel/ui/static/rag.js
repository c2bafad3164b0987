/* Knowledge-base pages: uploads with a progress bar, chunk spans on a document's text, and
 * the same chunk marked across the retrieval columns.
 *
 * Served from /static (the Content-Security-Policy allows no inline scripts). Without it the
 * upload form posts normally and chunk links reload the page with ?chunk=N.
 */
(function () {
  "use strict";
  if (window.flywheelRag) return;
  window.flywheelRag = true;

  // -- uploads ------------------------------------------------------------------------------

  // A folder's file is sent under its path inside the folder ("guide/install.md"), so
  // sources keep the folder's structure; a single file under its name.
  function sourceName(file, fromFolder) {
    var path = fromFolder && file.webkitRelativePath ? file.webkitRelativePath : "";
    if (!path) return file.name;
    var parts = path.split("/");
    return parts.length > 1 ? parts.slice(1).join("/") : path;
  }

  function uploadData(form) {
    var data = new FormData();
    var count = 0;
    form.querySelectorAll("input, textarea, select").forEach(function (field) {
      if (!field.name || field.disabled) return;
      if (field.type === "file") {
        var fromFolder = field.hasAttribute("webkitdirectory");
        Array.prototype.forEach.call(field.files || [], function (file) {
          data.append(field.name, file, sourceName(file, fromFolder));
          count += 1;
        });
      } else if ((field.type !== "checkbox" && field.type !== "radio") || field.checked) {
        data.append(field.name, field.value);
      }
    });
    return { data: data, count: count };
  }

  function showReport(html) {
    var current = document.getElementById("ingest-report");
    if (!current) return null;
    var holder = document.createElement("div");
    holder.innerHTML = html;
    var report = holder.querySelector("#ingest-report");
    if (!report) return null;
    current.replaceWith(report);
    if (window.htmx) window.htmx.process(report);
    return report;
  }

  function showProblem(text) {
    var current = document.getElementById("ingest-report");
    if (!current) return;
    var notice = document.createElement("div");
    notice.className = "notice notice-error";
    notice.setAttribute("role", "alert");
    notice.id = "ingest-error";
    notice.textContent = text;
    current.replaceChildren(notice);
  }

  function upload(form) {
    var progress = form.querySelector("progress");
    var status = form.querySelector("[role=status]");
    var button = form.querySelector("button[type=submit]");
    var token = form.querySelector("input[name=csrf_token]");
    var payload = uploadData(form);
    var xhr = new XMLHttpRequest();
    function say(text) {
      if (status) status.textContent = text;
    }
    function done() {
      if (button) button.disabled = false;
      if (progress) progress.hidden = true;
      form.removeAttribute("data-uploading");
    }
    xhr.open("POST", form.getAttribute("action"));
    xhr.setRequestHeader("HX-Request", "true");
    xhr.setRequestHeader("HX-Target", "ingest-report");
    if (token) xhr.setRequestHeader("X-CSRF-Token", token.value);
    xhr.upload.addEventListener("progress", function (event) {
      if (!progress || !event.lengthComputable) return;
      var pct = Math.round((event.loaded / event.total) * 100);
      progress.value = pct;
      say("Uploading " + payload.count + " file" + (payload.count === 1 ? "" : "s") + ": " + pct + "%");
    });
    xhr.upload.addEventListener("load", function () {
      // The bytes are there; reading, chunking and embedding happen before the answer.
      if (progress) progress.removeAttribute("value");
      say("Uploaded; indexing…");
    });
    xhr.addEventListener("load", function () {
      done();
      var redirect = xhr.getResponseHeader("HX-Redirect");
      if (redirect) {
        window.location.assign(redirect);
        return;
      }
      var report = showReport(xhr.responseText);
      if (!report) {
        say("");
        showProblem("The server refused the upload (HTTP " + xhr.status + ").");
        return;
      }
      say(xhr.status < 400 ? "Done." : "");
      if (xhr.status < 400) {
        form.querySelectorAll("input[type=file]").forEach(function (input) {
          input.value = "";
        });
        document.body.dispatchEvent(new CustomEvent("kb-changed", { bubbles: true }));
      }
    });
    xhr.addEventListener("error", function () {
      done();
      say("");
      showProblem("The upload failed: the server could not be reached.");
    });
    if (button) button.disabled = true;
    if (progress) {
      progress.value = 0;
      progress.hidden = false;
    }
    form.setAttribute("data-uploading", "true");
    say("Uploading…");
    xhr.send(payload.data);
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-kb-upload")) return;
    event.preventDefault();
    if (form.hasAttribute("data-uploading")) return;
    upload(form);
  });

  // -- a document's chunks ------------------------------------------------------------------

  function markChunk(position) {
    var text = document.getElementById("document-text");
    if (!text) return;
    var first = null;
    text.querySelectorAll(".seg").forEach(function (seg) {
      var inside = (seg.getAttribute("data-chunks") || "").split(" ").indexOf(position) !== -1;
      seg.classList.toggle("is-active", inside);
      if (inside && !first) first = seg;
    });
    text.setAttribute("data-selected", position);
    document.querySelectorAll("tr.chunk-row").forEach(function (row) {
      row.classList.toggle("row-current", row.getAttribute("data-chunk") === position);
    });
    if (first) first.scrollIntoView({ block: "center", behavior: "smooth" });
    var url = new URL(window.location.href);
    url.searchParams.set("chunk", position);
    url.hash = "";
    window.history.replaceState(null, "", url.toString());
  }

  document.addEventListener("click", function (event) {
    var link = event.target instanceof Element ? event.target.closest("[data-chunk-link]") : null;
    if (!link || event.ctrlKey || event.metaKey || event.shiftKey) return;
    event.preventDefault();
    markChunk(link.getAttribute("data-chunk-link"));
  });

  // -- retrieval columns: the same chunk lit up in every column ------------------------------

  function linkHits(hit, on) {
    var id = hit.getAttribute("data-chunk-id");
    var columns = hit.closest(".search-columns");
    if (!columns || !id) return;
    columns.querySelectorAll(".hit[data-chunk-id='" + id + "']").forEach(function (other) {
      other.classList.toggle("is-linked", on);
    });
  }

  ["mouseover", "mouseout"].forEach(function (kind) {
    document.addEventListener(kind, function (event) {
      var hit = event.target instanceof Element ? event.target.closest(".hit[data-chunk-id]") : null;
      if (!hit) return;
      var related = event.relatedTarget instanceof Element ? event.relatedTarget.closest(".hit") : null;
      if (related === hit) return;
      linkHits(hit, kind === "mouseover");
    });
  });
})();

// Keyboard shortcuts of the rlfh labeling page (rlfh/labeling/page.py). Every key presses one of
// the page's own form controls, so the server sees exactly what a click would send.
(function () {
  "use strict";
  var body = document.body;
  var mode = body.dataset.mode;
  var n = parseInt(body.dataset.n, 10) || 0;
  var form = document.getElementById("choice");
  var items = Array.prototype.slice.call(document.querySelectorAll("figure.item"));
  var best = null;
  var sent = false;

  ["boxes", "rewards"].forEach(function (what) {
    var box = document.getElementById("show-" + what);
    if (!box) return;
    box.checked = localStorage.getItem("rlfh-show-" + what) === "1";
    body.classList.toggle("show-" + what, box.checked);
    box.addEventListener("change", function () {
      body.classList.toggle("show-" + what, box.checked);
      localStorage.setItem("rlfh-show-" + what, box.checked ? "1" : "0");
    });
  });

  function toggle(what) {
    var box = document.getElementById("show-" + what);
    if (box) box.click();
  }

  function press(button) {
    // one submission per page: a key held down or pressed twice must not send two labels
    if (sent || !button) return;
    sent = true;
    button.form.requestSubmit(button);
  }

  function radio(name, k) {
    return items[k - 1].querySelector('input[name="' + name + '"]');
  }

  function pickBestWorst(k) {
    if (best === null) {
      best = k;
      radio("winner", k).checked = true;
      items[k - 1].classList.add("best");
      if (n === 2) press(document.getElementById("save"));
    } else if (k !== best) {
      radio("loser", k).checked = true;
      items[k - 1].classList.add("worst");
      press(document.getElementById("save"));
    }
  }

  function clear() {
    best = null;
    items.forEach(function (fig) {
      fig.classList.remove("best", "worst");
    });
    if (form) form.reset();
  }

  function pick(k) {
    if (!form || k < 1 || k > n) return;
    if (mode === "best-worst") pickBestWorst(k);
    else press(items[k - 1].querySelector("button[name=winner]"));
  }

  var keys = {
    ArrowLeft: function () { if (mode !== "best-worst") pick(1); },
    ArrowRight: function () { if (mode !== "best-worst") pick(2); },
    "0": function () { press(document.getElementById("tie")); },
    s: function () { press(document.getElementById("skip")); },
    u: function () { press(document.getElementById("undo")); },
    Backspace: function () { press(document.getElementById("undo")); },
    b: function () { toggle("boxes"); },
    r: function () { toggle("rewards"); },
    Escape: clear,
  };

  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    var key = ev.key.length === 1 ? ev.key.toLowerCase() : ev.key;
    if (/^[1-9]$/.test(key)) {
      ev.preventDefault();
      pick(parseInt(key, 10));
    } else if (keys[key]) {
      ev.preventDefault();
      keys[key]();
    }
  });
})();

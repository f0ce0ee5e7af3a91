// Render the maths of every page with the vendored KaTeX (docs/assets/katex/), offline.
//
// pymdownx.arithmatex (generic mode) wraps inline maths as <span class="arithmatex">\( ... \)</span>
// and display maths as <div class="arithmatex">\[ ... \]</div>. We render only inside those
// elements, so a stray "$" or "\(" in prose or code is never touched.
(function () {
  "use strict";

  var options = {
    delimiters: [
      { left: "\\[", right: "\\]", display: true },
      { left: "\\(", right: "\\)", display: false },
    ],
    throwOnError: false, // a typo shows the TeX source in red instead of breaking the page
  };

  function renderMath() {
    if (typeof renderMathInElement !== "function") {
      return; // KaTeX failed to load: leave the TeX source readable
    }
    var blocks = document.querySelectorAll(".arithmatex");
    for (var i = 0; i < blocks.length; i++) {
      renderMathInElement(blocks[i], options);
    }
  }

  if (typeof document$ !== "undefined" && typeof document$.subscribe === "function") {
    // mkdocs-material emits on the first load and after every instant navigation.
    document$.subscribe(renderMath);
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", renderMath);
  } else {
    renderMath();
  }
})();

// Small DOM helpers: elements from a tag, attributes and children; numbers as the API gives them.

export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function table(caption, columns, rows) {
  // columns: [label, (row) => cell, {num: true}?]
  return h("div", { class: "scroll" },
    h("table", {},
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, columns.map(([label, , opts = {}]) =>
        h("th", { scope: "col", class: opts.num ? "num" : null }, label)))),
      h("tbody", {}, rows.map((row) => h("tr", {}, columns.map(([, cell, opts = {}]) =>
        h("td", { class: opts.num ? "num" : null }, cell(row))))))));
}

export function pct(value) {
  return value === null || value === undefined ? "—" : `${(100 * value).toFixed(1)} %`;
}

export function interval(ci) {
  return ci ? `[${(100 * ci[0]).toFixed(1)}, ${(100 * ci[1]).toFixed(1)}]` : "—";
}

export function errorBox(error) {
  const code = error.code ? ` (${error.status} ${error.code})` : "";
  return h("p", { class: "error", role: "alert" }, `${error.message}${code}`);
}

export function field(text, control) {
  // a label beside (not around) its control, so the control's name is the label's text alone
  return h("div", { class: "field" }, h("label", { for: control.id }, text), control);
}

export function notify(...nodes) {
  // what an action did (or why it failed), above the page, so it stays when the page is drawn again
  document.getElementById("status").replaceChildren(...nodes);
}

export function refresh() {
  // draw the current page again (its streams closed first); synchronous up to the page's first wait
  window.dispatchEvent(new Event("softprompt:refresh"));
}

(function () {
  'use strict';
  var cards = {};
  document.querySelectorAll('.card').forEach(function (c) { cards[c.getAttribute('data-node')] = c; });
  var svgNodes = {};
  document.querySelectorAll('#graph g.node').forEach(function (g) {
    var t = g.querySelector('title');
    if (!t) { return; }
    var id = t.textContent.trim();
    svgNodes[id] = g;
    g.addEventListener('click', function (ev) { ev.preventDefault(); openCard(id); });
  });
  function openCard(id) {
    var c = cards[id];
    if (!c) { return false; }
    Object.keys(cards).forEach(function (k) { cards[k].classList.remove('open'); });
    Object.keys(svgNodes).forEach(function (k) { svgNodes[k].classList.remove('sel'); });
    c.classList.add('open');
    if (svgNodes[id]) { svgNodes[id].classList.add('sel'); }
    document.getElementById('hint').style.display = 'none';
    document.getElementById('panel').scrollTop = 0;
    if (decodeURIComponent(location.hash.slice(1)) !== id) {
      history.replaceState(null, '', '#' + encodeURIComponent(id));
    }
    return true;
  }
  document.querySelectorAll('[data-open]').forEach(function (el) {
    el.addEventListener('click', function (ev) {
      ev.preventDefault();
      openCard(el.getAttribute('data-open'));
    });
  });
  document.querySelectorAll('.close').forEach(function (b) {
    b.addEventListener('click', function () {
      Object.keys(cards).forEach(function (k) { cards[k].classList.remove('open'); });
      Object.keys(svgNodes).forEach(function (k) { svgNodes[k].classList.remove('sel'); });
      document.getElementById('hint').style.display = '';
    });
  });
  window.featcircuitOpen = openCard;
  function fromHash() {
    if (location.hash.length > 1) { openCard(decodeURIComponent(location.hash.slice(1))); }
  }
  window.addEventListener('hashchange', fromHash);
  fromHash();
})();

// nni_fedexit: make the NNI manager's web server listen on one host (127.0.0.1 by default).
//
// NNI 3.0's REST server calls `app.listen(port)` with no host, so node binds every interface, and
// NNI has no option to change that. This file is loaded into the NNI manager's node process with
// `NODE_OPTIONS=--require /abs/path/webui_localhost.js` (see nni_fedexit/nni_tools/webui.py); it changes no
// file of NNI. It wraps `net.Server.prototype.listen` (which http.Server and express use): a TCP
// listen without a host, or with a wildcard host ("0.0.0.0", "::", ""), gets the host given by
// NNI_FEDEXIT_LISTEN_HOST (default 127.0.0.1). Calls that name another host, Unix sockets / pipes,
// and handles / file descriptors are left exactly as they are.
//
// It then removes itself from process.env.NODE_OPTIONS, so the processes the manager starts
// (the tuner, the trials) do not inherit it.
'use strict';

const net = require('net');

const HOST = process.env.NNI_FEDEXIT_LISTEN_HOST || '127.0.0.1';
const WILDCARDS = new Set(['', '0.0.0.0', '::', '[::]', '::0', '0:0:0:0:0:0:0:0']);
const MARK = Symbol.for('nni_fedexit.webui_localhost');

function isWildcard(host) {
  return host === undefined || host === null || (typeof host === 'string' && WILDCARDS.has(host.trim()));
}

// Node's own rule (lib/net.js, isPipeName): a string that is not a non-negative number is a pipe path.
function isPort(value) {
  if (value === undefined || value === null) return true;  // listen() / listen(undefined, ...): random port
  if (typeof value === 'number') return true;
  if (typeof value === 'string') return Number(value) >= 0;
  return false;
}

function rewriteArgs(args) {
  if (args.length === 0) return [0, HOST];
  const first = args[0];
  if (typeof first === 'function') return [0, HOST, ...args];  // listen(callback)
  if (first !== null && typeof first === 'object') {
    // listen(options[, cb]) or listen(handle[, backlog][, cb]).
    const isOptions = Object.getPrototypeOf(first) === Object.prototype;
    if (!isOptions) return args;  // a handle (TCP wrap, server, socket): leave it
    if (first.path !== undefined || first.fd !== undefined || first.handle !== undefined
        || first._handle !== undefined) return args;
    if (!isWildcard(first.host)) return args;
    return [Object.assign({}, first, { host: HOST }), ...args.slice(1)];
  }
  if (!isPort(first)) return args;  // listen(path, ...): a Unix socket / named pipe
  // listen(port[, host][, backlog][, callback])
  if (typeof args[1] === 'string') {
    if (!isWildcard(args[1])) return args;
    return [first, HOST, ...args.slice(2)];
  }
  if (args.length >= 2 && (args[1] === undefined || args[1] === null)) {
    return [first, HOST, ...args.slice(2)];
  }
  return [first, HOST, ...args.slice(1)];
}

if (!net.Server.prototype.listen[MARK]) {
  const originalListen = net.Server.prototype.listen;
  const listen = function listen(...args) {
    return originalListen.apply(this, rewriteArgs(args));
  };
  listen[MARK] = true;
  listen.original = originalListen;
  net.Server.prototype.listen = listen;
}

// Do not pass this preload on to child processes: remove the "--require <this file>" option that
// nni_fedexit.nni_tools.webui.node_options() wrote (plain or double-quoted path, "=" or a space).
if (process.env.NODE_OPTIONS) {
  const escaped = __filename.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const own = new RegExp(`(^|\\s)(--require|-r)(=|\\s+)("?)${escaped}\\4(?=\\s|$)`, 'g');
  const rest = process.env.NODE_OPTIONS.replace(own, ' ').trim();
  if (rest) process.env.NODE_OPTIONS = rest;
  else delete process.env.NODE_OPTIONS;
}

module.exports = { rewriteArgs, HOST };

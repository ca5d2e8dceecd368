#!/usr/bin/env node
// MQTT 3.1.1 and 5 conformance cases driven by MQTT.js (npm package `mqtt`).
//
//   node mqttjs_suite.js --host 127.0.0.1 --v4 1883 --v5 1884
//
// Each case prints one JSON line on stdout (suite, client, protocol, case, result, detail).
// Clients keep MQTT.js's defaults (keep alive 60, client id mqttjs_<random>, reconnect period 1 s)
// unless the case is about that setting. Every wait has a timeout and every case runs under a
// deadline; all clients a case opened are closed when it ends, whatever happened.
'use strict'

const crypto = require('crypto')
const mqtt = require('mqtt')
const LIB = `mqtt.js ${require('mqtt/package.json').version}`

const WAIT = 3000 // ms to wait for something that must happen
const QUIET = 1000 // ms to wait to be sure something does not happen
const CASE_DEADLINE = 20000

class Failed extends Error {}
function check (cond, msg) {
  if (!cond) throw new Failed(msg)
}
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

function withTimeout (p, ms, what) {
  let timer
  const t = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Failed(`${what}: no answer in ${ms} ms`)), ms)
  })
  return Promise.race([p, t]).finally(() => clearTimeout(timer))
}

// A connected client that records messages. `open` is the case's list of clients to close.
class Client {
  constructor (args, proto, open, opts = {}) {
    this.v5 = proto === '5'
    const port = this.v5 ? args.v5 : args.v4
    const o = { protocolVersion: this.v5 ? 5 : 4, ...opts }
    if (proto === '3.1') Object.assign(o, { protocolId: 'MQIsdp', protocolVersion: 3 })
    this.msgs = []
    this.waiters = []
    this.closed = false
    this.c = mqtt.connect(`mqtt://${args.host}:${port}`, o)
    open.push(this)
    this.c.on('message', (topic, payload, packet) => {
      this.msgs.push({ topic, payload: payload.toString(), qos: packet.qos, retain: packet.retain })
      this.waiters.forEach((w) => w())
    })
    this.c.on('close', () => { this.closed = true })
    this.c.on('error', (e) => { this.error = e })
    this.connack = withTimeout(new Promise((resolve) => {
      this.c.once('connect', resolve)
    }), WAIT, 'CONNACK')
  }

  async ready () {
    try {
      this.ack = await this.connack
    } catch (e) {
      const why = this.error ? ` (${this.error.message})` : ''
      throw new Failed(`no CONNACK 0${why}`)
    }
    return this.ack
  }

  async subscribe (topic, qos, extra = {}) {
    const granted = await withTimeout(this.c.subscribeAsync(topic, { qos, ...extra }), WAIT,
      `SUBACK for ${topic}`)
    return granted[0].qos
  }

  async unsubscribe (topic) {
    await withTimeout(this.c.unsubscribeAsync(topic), WAIT, `UNSUBACK for ${topic}`)
  }

  async publish (topic, payload, qos = 0, extra = {}) {
    await withTimeout(this.c.publishAsync(topic, payload, { qos, ...extra }), WAIT,
      `publish QoS ${qos} to ${topic}`)
  }

  // Up to n messages within ms (all that are buffered are taken).
  async recvN (n, ms = WAIT) {
    const deadline = Date.now() + ms
    while (this.msgs.length < n && Date.now() < deadline) {
      await new Promise((resolve) => {
        const t = setTimeout(done, Math.max(0, deadline - Date.now()))
        const self = this
        function done () {
          clearTimeout(t)
          self.waiters = self.waiters.filter((w) => w !== done)
          resolve()
        }
        this.waiters.push(done)
      })
    }
    return this.msgs.splice(0, n)
  }

  async recv (ms = WAIT) {
    return (await this.recvN(1, ms))[0]
  }

  async drain (ms = QUIET) {
    await sleep(ms)
    return this.msgs.splice(0)
  }

  // Normal DISCONNECT.
  async end (opts) {
    await withTimeout(new Promise((resolve) => this.c.end(false, opts || {}, resolve)), WAIT,
      'DISCONNECT')
  }

  // Abnormal: the socket closes without DISCONNECT.
  drop () {
    this.c.options.reconnectPeriod = 0
    this.c.stream.destroy()
  }
}

async function connect (args, proto, open, opts) {
  const c = new Client(args, proto, open, opts)
  await c.ready()
  return c
}

async function persistent (a, proto, open, clientId, clean, expiry = 300) {
  const opts = { clientId, clean }
  if (proto === '5') opts.properties = { sessionExpiryInterval: expiry }
  return connect(a, proto, open, opts)
}

// A new persistent session (3.1.1: wiped by a clean connect first).
async function freshPersistent (a, proto, open, clientId) {
  let c
  if (proto === '5') {
    c = await persistent(a, proto, open, clientId, true)
  } else {
    await (await persistent(a, proto, open, clientId, true)).end()
    c = await persistent(a, proto, open, clientId, false)
  }
  check(!c.ack.sessionPresent, 'session present on a fresh session')
  return c
}

async function endSession (a, proto, open, clientId) {
  await (await persistent(a, proto, open, clientId, true, 0)).end()
}

const cases = {}

cases.wildcard_no_gateway_chatter = async (a, proto, r, open) => {
  const c = await connect(a, proto, open)
  await c.subscribe('#', 0)
  await c.subscribe('+/+', 0)
  const got = (await c.drain(3000)).filter((m) => !m.topic.startsWith('ct/') && !m.topic.startsWith('$ct-'))
  await c.end()
  const topics = {}
  got.forEach((m) => { topics[m.topic] = (topics[m.topic] || 0) + 1 })
  check(got.length === 0, `${got.length} message(s) not from any client: ${JSON.stringify(topics)}`)
  return "no messages in 3 s on '#' and '+/+' besides the suites' own"
}

cases.connect_keepalive_0 = async (a, proto, r, open) => {
  const c = await connect(a, proto, open, { keepalive: 0 })
  await c.end()
  return 'CONNACK 0 with keep alive 0'
}

cases.connect_empty_id_clean = async (a, proto, r, open) => {
  const c = await connect(a, proto, open, { clientId: '', reconnectPeriod: 0 })
  let detail = 'accepted'
  if (proto === '5') {
    const id = c.ack.properties && c.ack.properties.assignedClientIdentifier
    check(id, 'CONNACK has no Assigned Client Identifier')
    detail += `, assigned id ${id}`
  }
  await c.end()
  return detail
}

cases.session_present = async (a, proto, r, open) => {
  const id = `${r.id}-sp`
  let c = await freshPersistent(a, proto, open, id)
  await c.subscribe(`${r.t}/sp`, 1)
  await c.end()
  c = await persistent(a, proto, open, id, false)
  const sp = c.ack.sessionPresent
  await c.end()
  c = await persistent(a, proto, open, id, true, 0)
  const spClean = c.ack.sessionPresent
  await c.end()
  check(sp, 'session present 0 on reconnect of a persistent session')
  check(!spClean, 'session present 1 on a clean reconnect')
  return 'session present 1 on resume, 0 after clean'
}

cases.retained_receive = async (a, proto, r, open) => {
  const t = `${r.t}/ret`
  const pub = await connect(a, proto, open)
  await pub.publish(t, 'kept', 1, { retain: true })
  const sub = await connect(a, proto, open)
  await sub.subscribe(t, 1)
  const m = await sub.recv()
  check(m, 'retained message not delivered on subscribe')
  check(m.retain, 'retained message delivered without the retain flag')
  check(m.payload === 'kept', `payload ${m.payload}`)
  return 'delivered on subscribe with retain=1'
}

cases.retained_clear = async (a, proto, r, open) => {
  const t = `${r.t}/retclr`
  const pub = await connect(a, proto, open)
  await pub.publish(t, 'kept', 1, { retain: true })
  await sleep(100)
  await pub.publish(t, '', 1, { retain: true })
  await sleep(100)
  const sub = await connect(a, proto, open)
  await sub.subscribe(t, 1)
  const got = await sub.drain()
  check(got.length === 0, `still delivered after clearing: ${got.map((m) => m.payload)}`)
  return 'nothing delivered after an empty retained publish'
}

cases.will_abnormal_disconnect = async (a, proto, r, open) => {
  const t = `${r.t}/will`
  const sub = await connect(a, proto, open)
  await sub.subscribe(t, 1)
  const c = await connect(a, proto, open, { will: { topic: t, payload: 'gone', qos: 1 } })
  c.drop()
  const m = await sub.recv()
  check(m && m.payload === 'gone', 'will not delivered after the socket closed')
  return 'will delivered'
}

cases.will_not_on_disconnect = async (a, proto, r, open) => {
  const t = `${r.t}/willn`
  const sub = await connect(a, proto, open)
  await sub.subscribe(t, 1)
  const c = await connect(a, proto, open, { will: { topic: t, payload: 'gone', qos: 1 } })
  await c.end()
  const got = await sub.drain()
  check(got.length === 0, 'will delivered after a normal DISCONNECT')
  return 'no will after DISCONNECT'
}

cases.unsubscribe = async (a, proto, r, open) => {
  const t = `${r.t}/unsub`
  const sub = await connect(a, proto, open)
  await sub.subscribe(t, 1)
  const pub = await connect(a, proto, open)
  await pub.publish(t, 'one', 1)
  check(await sub.recv(), 'not delivered while subscribed')
  await sub.unsubscribe(t)
  await pub.publish(t, 'two', 1)
  const got = await sub.drain()
  check(got.length === 0, 'delivered after UNSUBACK')
  return 'nothing after unsubscribe'
}

cases.overlapping_subscriptions = async (a, proto, r, open) => {
  const t = `${r.t}/ov/a`
  const sub = await connect(a, proto, open)
  await sub.subscribe(`${r.t}/ov/#`, 1)
  await sub.subscribe(t, 0)
  const pub = await connect(a, proto, open)
  await pub.publish(t, 'x', 2)
  const got = await sub.recvN(2, 1500)
  const qos = got.map((m) => m.qos).sort()
  check(got.length > 0, 'not delivered')
  check(Math.max(...qos) === 1,
    `copies at QoS [${qos}]: one must respect the maximum matching QoS 1`)
  return `${got.length} copies at QoS [${qos}]`
}

cases.dollar_topics_not_matched = async (a, proto, r, open) => {
  const dollar = `$ct-${r.id}/x`
  const exact = await connect(a, proto, open)
  await exact.subscribe(dollar, 0)
  const wild = await connect(a, proto, open)
  await wild.subscribe('#', 0)
  await wild.subscribe('+/x', 0)
  const pub = await connect(a, proto, open)
  await pub.publish(dollar, 'd', 1)
  const m = await exact.recv()
  const leaked = (await wild.drain()).filter((w) => w.topic === dollar)
  check(leaked.length === 0, `'#' or '+/x' matched ${dollar} (${leaked.length} message(s))`)
  check(m, `${dollar} not delivered even to an exact subscription`)
  return 'delivered to the exact filter only'
}

cases.offline_queue = async (a, proto, r, open) => {
  const id = `${r.id}-offq`
  const t = `${r.t}/offq`
  let c = await freshPersistent(a, proto, open, id)
  await c.subscribe(t, 1)
  await c.end()
  const pub = await connect(a, proto, open)
  for (let i = 0; i < 3; i++) await pub.publish(t, `m${i}`, 1)
  await pub.end()
  c = await persistent(a, proto, open, id, false)
  const sp = c.ack.sessionPresent
  const got = await c.recvN(3)
  await c.end()
  await endSession(a, proto, open, id)
  check(sp, 'no session present on reconnect')
  check(got.length === 3, `${got.length} of 3 QoS 1 messages published while away arrived`)
  return '3 of 3 arrived on reconnect'
}

cases.mqtt31_connack = async (a, proto, r, open) => {
  const c = new Client(a, '3.1', open, { reconnectPeriod: 0 })
  let rc
  try {
    rc = (await c.ready()).returnCode
  } catch (e) {
    // MQTT.js reports a refusal as an error carrying the return code.
    if (c.error && typeof c.error.code === 'number') rc = c.error.code
    else throw e
  }
  check(rc === 0 || rc === 1,
    `CONNACK ${rc}, expected 0 (3.1 supported) or 1 (unacceptable protocol version)`)
  return `CONNACK 0x0${rc}`
}

// MQTT 5 only
cases.session_expiry_zero = async (a, proto, r, open) => {
  // Made with clean start 0: only the expiry of 0 says that it ends at the disconnect.
  const id = `${r.id}-sx0`
  let c = await persistent(a, proto, open, id, false, 0)
  await c.subscribe(`${r.t}/sx0`, 1)
  await c.end()
  c = await persistent(a, proto, open, id, false, 0)
  const sp = c.ack.sessionPresent
  await c.end()
  check(!sp, 'session present after a session with expiry 0 ended')
  return 'expiry 0: session ends at disconnect'
}

cases.topic_alias = async (a, proto, r, open) => {
  const t = `${r.t}/alias`
  const sub = await connect(a, proto, open)
  await sub.subscribe(t, 1)
  const pub = await connect(a, proto, open)
  const tam = (pub.ack.properties && pub.ack.properties.topicAliasMaximum) || 0
  check(tam >= 1, 'server Topic Alias Maximum is 0: topic aliases not accepted')
  await pub.publish(t, 'first', 1, { properties: { topicAlias: 1 } })
  await pub.publish('', 'second', 1, { properties: { topicAlias: 1 } })
  const got = await sub.recvN(2)
  check(got.length === 2, `${got.length} of 2 delivered`)
  check(got.every((m) => m.topic === t), `topics ${got.map((m) => m.topic)}`)
  return `alias maximum ${tam}; alias set and used`
}

cases.maximum_packet_size = async (a, proto, r, open) => {
  const t = `${r.t}/maxpkt`
  const sub = await connect(a, proto, open, { properties: { maximumPacketSize: 256 } })
  await sub.subscribe(t, 0)
  const pub = await connect(a, proto, open)
  await pub.publish(t, 'small', 1)
  await pub.publish(t, 'L'.repeat(1000), 1)
  await pub.publish(t, 'after', 1)
  const sizes = (await sub.drain()).map((m) => m.payload.length)
  check(sizes.every((s) => s < 256),
    `server sent a packet over the client's 256-byte maximum (payload sizes ${sizes})`)
  check(sizes.length === 2, `payload sizes ${sizes}, expected the two small ones`)
  check(!sub.closed, 'subscriber was disconnected')
  return 'oversized message withheld, small ones delivered'
}

cases.no_local = async (a, proto, r, open) => {
  const t = `${r.t}/nolocal`
  const c = await connect(a, proto, open)
  await c.subscribe(t, 1, { nl: true })
  const other = await connect(a, proto, open)
  await c.publish(t, 'own', 1)
  await other.publish(t, 'other', 1)
  const got = (await c.drain()).map((m) => m.payload)
  check(!got.includes('own'), 'own message delivered despite No Local')
  check(got.length === 1 && got[0] === 'other', `got ${got}`)
  return 'own publish not echoed'
}

const COMMON = ['wildcard_no_gateway_chatter', 'connect_keepalive_0', 'connect_empty_id_clean',
  'session_present', 'retained_receive', 'retained_clear', 'will_abnormal_disconnect',
  'will_not_on_disconnect', 'unsubscribe', 'overlapping_subscriptions',
  'dollar_topics_not_matched', 'offline_queue']
const V4_ONLY = ['mqtt31_connack']
const V5_ONLY = ['session_expiry_zero', 'topic_alias', 'maximum_packet_size', 'no_local']

function emit (proto, name, ok, detail) {
  console.log(JSON.stringify({ suite: 'mqttjs', client: LIB, protocol: proto, case: name,
    result: ok ? 'pass' : 'fail', detail }))
}

async function closeAll (open) {
  for (const c of open) {
    c.c.options.reconnectPeriod = 0
    c.c.end(true)
  }
  open.length = 0
}

async function runCase (name, fn, a, proto, r) {
  const open = []
  try {
    const detail = await withTimeout(fn(a, proto, r, open), CASE_DEADLINE, 'case')
    emit(proto, name, true, detail)
  } catch (e) {
    emit(proto, name, false, e instanceof Failed ? e.message : `${e.name}: ${e.message}`)
  }
  await closeAll(open)
}

async function qosCases (a, proto, r) {
  const open = []
  try {
    const pub = await connect(a, proto, open)
    for (let s = 0; s < 3; s++) {
      const t = `${r.t}/qos/sub${s}`
      const sub = await connect(a, proto, open)
      const granted = await sub.subscribe(t, s)
      for (let p = 0; p < 3; p++) {
        const name = `qos_pub${p}_sub${s}`
        try {
          check([0, 1, 2].includes(granted), `subscription refused: SUBACK ${granted}`)
          await pub.publish(t, `p${p}`, p)
          const m = await sub.recv()
          check(m, 'message not delivered')
          const want = Math.min(p, granted)
          check(m.qos === want,
            `delivered at QoS ${m.qos}, expected min(${p}, granted ${granted}) = ${want}`)
          const extra = await sub.drain(200)
          check(extra.length === 0, `${extra.length} duplicate(s)`)
          emit(proto, name, true, `granted ${granted}, delivered QoS ${m.qos}`)
        } catch (e) {
          emit(proto, name, false, e.message)
          await sub.drain(200)
        }
      }
    }
  } catch (e) {
    emit(proto, 'qos_setup', false, e.message)
  }
  await closeAll(open)
}

async function main () {
  const argv = process.argv.slice(2)
  const arg = (k, d) => { const i = argv.indexOf(k); return i >= 0 ? argv[i + 1] : d }
  const a = { host: arg('--host', '127.0.0.1'), v4: Number(arg('--v4')), v5: Number(arg('--v5')) }
  const only = arg('--only')
  const skipChatter = argv.includes('--skip-chatter')
  const run = crypto.randomBytes(4).toString('hex')
  const protos = arg('--protocol') ? [arg('--protocol')] : ['3.1.1', '5']
  for (const proto of protos) {
    const tag = proto === '5' ? 'v5' : 'v4'
    const r = { id: `mqttjs-${run}-${tag}`, t: `ct/mqttjs-${run}/${tag}` }
    const names = COMMON.concat(proto === '5' ? V5_ONLY : V4_ONLY)
    if (argv.includes('--list')) {
      const qos = [0, 1, 2].flatMap((s) => [0, 1, 2].map((p) => `qos_pub${p}_sub${s}`))
      for (const name of qos.concat(names)) {
        console.log(JSON.stringify({ suite: 'mqttjs', protocol: proto, case: name }))
      }
      continue
    }
    if (!only || only.includes('qos')) await qosCases(a, proto, r)
    for (const name of names) {
      if (only && !name.includes(only)) continue
      if (skipChatter && name === 'wildcard_no_gateway_chatter') continue
      await runCase(name, cases[name], a, proto, r)
    }
  }
  process.exit(0)
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})

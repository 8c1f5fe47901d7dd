/**
 * `npm run demo -- --profile DIR`: where the CPU time of one request/response transaction (and of
 * one megabyte of a stream) goes, hop by hop, per path. Each pinned sockperf measurement and
 * each pinned 1-stream iperf3 runs under
 * `perf record -e cpu-clock -C 0 -g` (this VM has no PMU: cpu-clock sampling); client,
 * server and the softirq work of the whole path (veths deliver on the sending CPU) all run on
 * CPU 0, so CPU 0's samples in the measured processes (and ksoftirqd/0) are the path's cost,
 * without the rest of the machine's load.
 *
 * Each sample goes to one hop: the innermost function of its call chain that marks a hop
 * (a BPF program's frame before the TC code that called it, the TC code before the device
 * that ran it…), so the hops of a path add up to its total.
 */
import { PATHS, type PathName } from './report.ts';

export const PERF_FREQ = 4000;

/**
 * Hop entry points. Walking a sample's chain from the leaf, the first frame that is one of
 * these names the hop. Only entry points, never shared helpers (memcpy, skb_*, kmalloc): a
 * helper's time belongs to whoever called it, and conntrack lookups made by a program's
 * kfunc are the program's, not netfilter's (netfilter is entered through nf_hook_slow).
 */
const HOPS: [hop: string, frame: RegExp][] = [
  ['program masq', /^bpf_prog_[0-9a-f]+_masq/],
  ['program restore', /^bpf_prog_[0-9a-f]+_restore/],
  ['program init', /^bpf_prog_[0-9a-f]+_init/],
  ['other BPF programs', /^bpf_prog_/],
  ['TC dispatch (clsact/tcx, cls_bpf)', /^(tcx_run|tc_run|tcf_classify|cls_bpf_classify|sch_handle_ingress|sch_handle_egress)$/],
  ['VXLAN encap/decap', /^(vxlan_xmit|vxlan_xmit_one|vxlan_rcv|vxlan_encap_bypass|udp_tunnel_xmit_skb|iptunnel_xmit|udp_tunnel_sock|vxlan_gro_receive)$/],
  ['bridge', /^(br_handle_frame|br_handle_frame_finish|br_dev_xmit|br_forward|br_pass_frame_up|__br_forward)$/],
  ['netfilter, conntrack (nf_hook_slow)', /^nf_hook_slow$/],
  ['veth xmit', /^veth_xmit$/],
  ['IP forward', /^(ip_forward|ip_forward_finish)$/],
  ['receive dispatch (backlog, netif_receive)', /^(__netif_receive_skb_core|__netif_receive_skb_one_core|__netif_receive_skb|netif_receive_skb|process_backlog|net_rx_action|enqueue_to_backlog|__netif_rx|netif_rx)(\.constprop\.\d+)?$/],
  ['IP receive/output, routing, neighbour', /^(ip_rcv|ip_rcv_core|ip_rcv_finish|ip_rcv_finish_core|ip_local_deliver|ip_local_deliver_finish|ip_protocol_deliver_rcu|ip_output|ip_finish_output|ip_finish_output2|__ip_queue_xmit|ip_queue_xmit|__ip_local_out|ip_local_out|ip_route_input_noref|ip_route_input_slow|fib_table_lookup|neigh_resolve_output|neigh_output)(\.constprop\.\d+|\.isra\.\d+)?$/],
  ['device transmit queue', /^(__dev_queue_xmit|dev_queue_xmit|dev_hard_start_xmit|skb_do_redirect|__bpf_redirect)$/],
  ['TCP', /^(tcp_v4_rcv|tcp_v4_do_rcv|tcp_rcv_established|tcp_sendmsg|tcp_sendmsg_locked|tcp_recvmsg|tcp_recvmsg_locked|tcp_write_xmit|__tcp_transmit_skb|tcp_push|__tcp_push_pending_frames|tcp_ack|tcp_data_queue|tcp_cleanup_rbuf)$/],
  ['syscalls, scheduler, wake-ups', /^(do_syscall_64|entry_SYSCALL_64\w*|__schedule|schedule|try_to_wake_up|finish_task_switch(\.isra\.\d+)?|sock_def_readable|__x64_sys_\w+|syscall_exit_to_user_mode|do_epoll_wait|ep_poll|__sys_recvfrom|__sys_sendto)$/],
];
const OTHER_KERNEL = 'other kernel';
const USER = 'the tool (user space)';

export interface ProfileRun {
  path: PathName;
  /** `perf script -F comm,tid,ip,sym` of the run. */
  script: string;
  /** What the run did over the recording, in the table's unit: transactions, or megabytes received. */
  units: number;
}

/** The processes whose CPU 0 time is the path's: client, server (sockperf or iperf3), deferred softirq. */
const MEASURED = /^(sockperf|iperf3|ksoftirqd\/0)$/;

/** Samples per hop of one perf script output, only of the measured processes. */
export function hopSamples(script: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const block of script.split(/\n\s*\n/)) {
    const lines = block.split('\n').filter((l) => l.trim());
    if (!lines.length) continue;
    const comm = /^(\S+)/.exec(lines[0])?.[1] ?? '';
    if (!MEASURED.test(comm)) continue;
    const frames = lines.slice(1).map((l) => {
      const [addr, sym] = l.trim().split(/\s+/, 2);
      return { kernel: /^ffff/.test(addr), sym: (sym ?? '').replace(/\+0x[0-9a-f]+$/, '') };
    });
    let hop: string | undefined;
    for (const f of frames) {
      hop = HOPS.find(([, re]) => re.test(f.sym))?.[0];
      if (hop) break;
    }
    hop ??= frames[0]?.kernel ? OTHER_KERNEL : USER;
    out.set(hop, (out.get(hop) ?? 0) + 1);
  }
  return out;
}

/** µs of CPU per unit (transaction, megabyte), per hop and path, from every run's samples. */
export function perUnit(runs: readonly ProfileRun[], freq = PERF_FREQ): Map<PathName, Map<string, number>> {
  const out = new Map<PathName, Map<string, number>>();
  for (const path of PATHS) {
    const mine = runs.filter((r) => r.path === path);
    const tx = mine.reduce((n, r) => n + r.units, 0);
    if (!mine.length || !tx) continue;
    const sum = new Map<string, number>();
    for (const r of mine) for (const [hop, n] of hopSamples(r.script)) sum.set(hop, (sum.get(hop) ?? 0) + n);
    out.set(path, new Map([...sum].map(([hop, n]) => [hop, (n / freq / tx) * 1e6])));
  }
  return out;
}

/** The table: a row per hop, a column per path, then xmasq − host; the total last. */
export function renderProfile(runs: readonly ProfileRun[], unit = 'transaction', freq = PERF_FREQ): string {
  const t = perUnit(runs, freq);
  const paths = PATHS.filter((p) => t.has(p));
  const order = [...HOPS.map(([h]) => h), OTHER_KERNEL, USER];
  const hops = order.filter((h) => paths.some((p) => (t.get(p)!.get(h) ?? 0) > 0));
  const get = (p: PathName, h: string) => t.get(p)?.get(h) ?? 0;
  const total = (p: PathName) => [...(t.get(p)?.values() ?? [])].reduce((a, b) => a + b, 0);
  const diff = t.has('xmasq') && t.has('host');
  const f = (x: number) => x.toFixed(2);
  const sd = (x: number) => `${x >= 0 ? '+' : '−'}${Math.abs(x).toFixed(2)}`;
  const lines = [
    `| hop (µs of CPU 0 per ${unit}) | ${paths.join(' | ')}${diff ? ' | xmasq − host |' : ' |'}`,
    `|---|${paths.map(() => '---:').join('|')}|${diff ? '---:|' : ''}`,
    ...hops.map((h) => `| ${h} | ${paths.map((p) => f(get(p, h))).join(' | ')} |${diff ? ` ${sd(get('xmasq', h) - get('host', h))} |` : ''}`),
    `| **total** | ${paths.map((p) => `**${f(total(p))}**`).join(' | ')} |${diff ? ` **${sd(total('xmasq') - total('host'))}** |` : ''}`,
  ];
  const tx = paths.map((p) => `${p} ${Math.round(runs.filter((r) => r.path === p).reduce((n, r) => n + r.units, 0)).toLocaleString('en')}`).join(', ');
  return `${lines.join('\n')}\n\nProfiled (${unit}s): ${tx}; \`perf record -e cpu-clock -F ${freq} -C 0 -g\` around each pinned client, samples of the tool (client and server) and ksoftirqd/0 only.\n`;
}

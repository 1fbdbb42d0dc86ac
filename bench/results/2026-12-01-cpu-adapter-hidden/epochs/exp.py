"""Scratch: listwise adapter variants on cached embeddings. Prints test recall per epoch (diagnostic) and
held-out lemma overlap over the ranking set (the selection criterion)."""
import sys, time, json, argparse, os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np, torch
sys.path.insert(0, '/work/main/src'); sys.path.insert(0, '/work/main/bench')
from reembed.storage import json_lines
from reembed import adapter as A
ap = argparse.ArgumentParser()
ap.add_argument('--extra', type=int, default=7000)
ap.add_argument('--lemmas', type=int, default=38000)
ap.add_argument('--hidden', type=int, default=0)
ap.add_argument('--epochs', type=int, default=30)
ap.add_argument('--t', type=float, default=0.05)
ap.add_argument('--lr', type=float, default=1e-3)
ap.add_argument('--batch', type=int, default=256)
ap.add_argument('--doc-queries', type=int, default=1, help='use doc pairs as queries too')
ap.add_argument('--rank-docs', type=int, default=0, help='0: all')
ap.add_argument('--full-rank', type=int, default=0, help='W free (not just affine from procrustes)')
ap.add_argument('--wd', type=float, default=0.0)
ap.add_argument('--tag', default='')
ap.add_argument('--ema', type=float, default=0.0)
ap.add_argument('--cosine', type=int, default=0)
a = ap.parse_args()
torch.set_num_threads(1)
C = '/work/cache/adapter/'
D = '/work/main/tests/data/'
docs = [o for _, o in json_lines(open(D+'wordnet_glosses.jsonl','rb').read(), 'g')]
ids = np.array([d['id'] for d in docs], object)
qs = [q for _, q in json_lines(open(D+'wordnet_queries.jsonl','rb').read(), 'q')]
rel = [{r: 1.0 for r in q['relevant']} for q in qs]
o = np.load(C+'minilm-4000.npz'); n = np.load(C+'mpnet-4000.npz')
od, oq, nd, nq = o['docs'], o['queries'], n['docs'], n['queries']
labelled = {r for re in rel for r in re}
fit = np.array([i not in labelled for i in ids])
def chunks(w, pre, m):
    if not m: return np.zeros((0, 384 if w=='minilm' else 768), np.float32)
    return np.vstack([np.load(C+f'{w}-{pre}-1000-{i:03d}.npy') for i in range(-(-m//1000))])[:m]
ex_o, ex_n = chunks('minilm','fit',a.extra), chunks('mpnet','fit',a.extra)
lem_o, lem_n = chunks('minilm','qfit',2000+a.lemmas), chunks('mpnet','qfit',2000+a.lemmas)
sel_n = lem_n[:2000]
import adapter_recovery as B, make_wordnet_extract as W
from pathlib import Path
qlem = {q['query'].lower() for q in qs}
lab_lemmas = {l.lower() for d in docs if d['id'] in labelled for l in d['lemmas']}
sel_lemmas = B.fit_lemmas(Path('/tmp/wn'), qlem | lab_lemmas)[:2000]
extra_ids = [s_['id'] for s_ in B.fit_glosses(Path('/tmp/wn'), set(ids.tolist()), qlem)[:a.extra]]
doc_ids = [d['id'] for d in docs if d['id'] not in labelled] + extra_ids
lex = W.read_lexnames(Path('/tmp/wn') / W.LEXNAMES_MAN)
by_lemma = {}
for pos, name in W.FILES.items():
    for s_ in W.read_data(Path('/tmp/wn') / W.WORDNET / name, pos, lex):
        for l in s_['lemmas']: by_lemma.setdefault(l.lower(), set()).add(s_['id'])
pos_of = {d: i for i, d in enumerate(doc_ids)}
sel_rel = [[pos_of[i] for i in by_lemma.get(l, ()) if i in pos_of] for l in sel_lemmas]
lab_rows = [i for i, r in enumerate(sel_rel) if r]
print('labelled selection lemmas', len(lab_rows), flush=True); qx, qy = lem_n[2000:], lem_o[2000:]
x = A._normalize(np.vstack([nd[fit], ex_n])); y = A._normalize(np.vstack([od[fit], ex_o]))
odn, ndn = A._normalize(od), A._normalize(nd)
def rec(q):
    rows = A._top(q, odn, 10); return float(np.mean([A._recall(ids[r], re, 10) for r, re in zip(rows, rel)]))
newr = rec_new = float(np.mean([A._recall(ids[r], re, 10) for r, re in zip(A._top(nq, ndn, 10), rel)]))
rng = np.random.default_rng(0)
dsel = np.arange(len(x)) if not a.rank_docs else np.sort(rng.choice(len(x), a.rank_docs, replace=False))
dn, do = torch.from_numpy(x[dsel]), torch.from_numpy(y[dsel])
slot = np.full(len(x), -1); slot[dsel] = np.arange(len(dsel))
qn = np.vstack([qx] + ([x] if a.doc_queries else [])); own = np.concatenate([np.full(len(qx), -1)] + ([slot] if a.doc_queries else []))
qn, own = torch.from_numpy(qn), torch.from_numpy(own)
torch.manual_seed(0)
w0 = A._procrustes(x, y)
W = torch.nn.Parameter(torch.from_numpy(w0.copy())); b = torch.nn.Parameter(torch.zeros(384))
params = [W, b]
if a.hidden:
    W1 = torch.nn.Parameter(torch.randn(768, a.hidden) * (1/768**0.5)); b1 = torch.nn.Parameter(torch.zeros(a.hidden))
    W2 = torch.nn.Parameter(torch.zeros(a.hidden, 384)); b2 = torch.nn.Parameter(torch.zeros(384))
    params += [W1, b1, W2, b2]
scale = torch.nn.Parameter(torch.tensor(1/a.t)); params.append(scale)
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.wd)
def weights():
    with torch.no_grad():
        if a.ema: return {k: v.copy() for k, v in ema.items()}
        w = {'W': W.numpy().copy(), 'b': b.numpy().copy()}
        if a.hidden: w.update(W1=W1.numpy().copy(), b1=b1.numpy().copy(), W2=W2.numpy().copy(), b2=b2.numpy().copy())
        return w
def ev(ep, t0):
    ad = A.Adapter('listwise', weights())
    got = A._top(ad.apply(sel_n[lab_rows]), A._normalize(y), 10)
    sel_lab = float(np.mean([len(set(g) & set(sel_rel[i])) / min(10, len(sel_rel[i])) for g, i in zip(got, lab_rows)]))
    r = rec(ad.apply(nq)); s = A.query_overlap(ad, sel_n, x, y); s37 = A.query_overlap(ad, sel_n, x[:int(fit.sum())], y[:int(fit.sum())])
    print(json.dumps({'tag': a.tag, 'epoch': ep, 'recall': round(r, 4), 'recovery': round(r/newr, 4), 'sel_all': round(s, 4), 'sel_lab': round(sel_lab, 4), 'sel_3700': round(s37, 4), 's': round(time.time()-t0)}), flush=True)
ema = None
def raw():
    with torch.no_grad():
        w = {'W': W.numpy().copy(), 'b': b.numpy().copy()}
        if a.hidden: w.update(W1=W1.numpy().copy(), b1=b1.numpy().copy(), W2=W2.numpy().copy(), b2=b2.numpy().copy())
        return w
ema = raw()
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.cosine * (-(-len(qn)//a.batch))) if a.cosine else None
t0 = time.time(); ev(0, t0)
for ep in range(1, a.epochs+1):
    order = torch.randperm(len(qn))
    for i in range(0, len(qn), a.batch):
        idx = order[i:i+a.batch]; q = qn[idx]
        m = q @ W + b
        if a.hidden: m = m + torch.relu(q @ W1 + b1) @ W2 + b2
        m = torch.nn.functional.normalize(m, dim=1)
        teacher = q @ dn.T / a.t; student = scale * (m @ do.T)
        mine = own[idx]; rows = torch.nonzero(mine >= 0).squeeze(1)
        if len(rows):
            teacher[rows, mine[rows]] = -1e9
            student = student.index_put((rows, mine[rows]), torch.tensor(-1e9))
        loss = torch.nn.functional.kl_div(torch.log_softmax(student, 1), torch.log_softmax(teacher, 1), log_target=True, reduction='batchmean')
        opt.zero_grad(); loss.backward(); opt.step()
        if sched: sched.step()
        if a.ema:
            for k, v in raw().items(): ema[k] = a.ema * ema[k] + (1 - a.ema) * v
    ev(ep, t0)

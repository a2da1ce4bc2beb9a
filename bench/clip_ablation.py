"""Ablations behind the Fashion-MNIST zero-shot fix, outside the pipeline (seconds, not minutes, per run).

The bench's pieces, in one process: the contrastive task's two towers and loss, the CNN image tower
([32, 64, 128]) and the frozen MiniLM (features cached per caption), 8 classes trained (sandal and
pullover never seen), AdamW with the one-cycle schedule at 0.003, batch 128. Options (key=value):

    head=mlp|linear|frozen   the text projection: the task's MLP; one linear layer initialised as a scaled
                             isometry (orthonormal columns); or that linear layer frozen
    caps=names|phrases       captions "a photo of a sandal", or with the importer's PHRASES
    tpl=1..6                 how many of the importer's TEMPLATES training draws from (one per image)
    epochs=5 n=4000 seed=0   epochs (0 = the untrained towers), train images, seed
    anchor=0                 L2 penalty pulling the text projection back to its initial weights

Reports zero-shot on the first 4000 test images (top-1 among all 10 classes, on the seen and held-out
classes' images, and between the 2 held-out classes only) with the training templates and with the
bare names, and a linear probe (300 train images per class, 3000 test; on the unit embeddings and on the
CNN's features before the projection). Appends a line of JSON to bench/results/clip_fashion_ablation.jsonl.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/clip_ablation.py head=frozen caps=names seed=1
"""

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mmops_plugins.encoders.cnn_image import CNNImageEncoder
from mmops_plugins.encoders.hf_text import HFTextEncoder
from mmops_plugins.tasks.contrastive import ContrastiveTask
from torch import nn

from mmops.data.fashion_mnist import CLASSES, HELD_OUT, PHRASES, TEMPLATES, load

torch.set_num_threads(1)

args = dict(a.split("=") for a in sys.argv[1:])
head = args.get("head", "mlp")  # mlp | linear | frozen
caps = args.get("caps", "names")  # names | phrases
ntpl = int(args.get("tpl", "1"))  # templates used in training
anchor = float(args.get("anchor", "0"))  # L2 penalty of the text head toward its init
epochs = int(args.get("epochs", "5"))
n = int(args.get("n", "4000"))
seed = int(args.get("seed", "0"))
torch.manual_seed(seed)
rng = np.random.default_rng(seed)

data = load()
tri, trl = data["train"]
tei, tel = data["test"]
held = [CLASSES.index(c) for c in HELD_OUT]
order = rng.permutation(len(tri))
order = order[~np.isin(trl[order], held)][:n]
x_tr, y_tr = tri[order], trl[order]
x_te, y_te = tei[:4000], tel[:4000]

enc = HFTextEncoder()
cache = {}


def text(strs):
    new = [s for s in set(strs) if s not in cache]
    for i in range(0, len(new), 256):
        with torch.no_grad():
            v = enc(enc.preprocess(new[i : i + 256]))
        for s, r in zip(new[i : i + 256], v, strict=True):
            cache[s] = r
    return torch.stack([cache[s] for s in strs])


def label_text(c):
    return PHRASES[c] if caps == "phrases" else c


img = CNNImageEncoder(channels=[32, 64, 128])


def prep(a):
    return img.preprocess(np.repeat(a[..., None], 3, -1))


task = ContrastiveTask(labels=[CLASSES[c] for c in range(10) if c not in held], width=128)
net = task.network({"image": 128, "caption": 384}, 256, 0.1)
if head != "mlp":
    lin = nn.Linear(384, 128, bias=False)
    q, _ = torch.linalg.qr(torch.randn(384, 128))  # orthonormal columns: an isometry on a 128-d subspace
    with torch.no_grad():
        lin.weight.copy_(q.T * math.sqrt(384 / 128))
    net.proj["caption"] = lin
    if head == "frozen":
        lin.requires_grad_(False)
init = {k: v.detach().clone() for k, v in net.proj["caption"].state_dict().items()}
params = [p for p in list(img.parameters()) + list(net.parameters()) if p.requires_grad]
opt = torch.optim.AdamW(params, lr=0.003, weight_decay=1e-4)
bs = 128
steps = epochs * math.ceil(len(x_tr) / bs)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.003, total_steps=max(steps, 1), pct_start=0.25)
t0 = time.time()
for ep in range(epochs):
    img.train()
    net.train()
    perm = rng.permutation(len(x_tr))
    tot = 0
    for i in range(0, len(perm), bs):
        b = perm[i : i + bs]
        names = [CLASSES[c] for c in y_tr[b]]
        strs = [TEMPLATES[rng.integers(ntpl)].format(label_text(c)) for c in names]
        out = net({"image": img(prep(x_tr[b])), "caption": text(strs)})
        loss = task.loss(out, np.array(names, dtype=object))
        if anchor:
            loss = loss + anchor * sum(
                ((p - init[k]) ** 2).sum() for k, p in net.proj["caption"].state_dict(keep_vars=True).items()
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        tot += loss.item() * len(b)
    print(f"epoch {ep + 1} loss {tot / len(perm):.3f} {time.time() - t0:.0f}s", flush=True)
img.eval()
net.eval()
with torch.no_grad():

    def embed_img(a):
        return torch.cat([net.embed("image", img(prep(a[i : i + 500]))) for i in range(0, len(a), 500)]).numpy()

    def classemb(labels, tpls):
        e = torch.stack([net.embed("caption", text([t.format(w) for t in tpls])).mean(0) for w in labels])
        return nn.functional.normalize(e, dim=-1).detach().numpy()

    e_te = embed_img(x_te)
res = dict(args)
for zs_name, tpls, lab in [("train_tpls", TEMPLATES[:ntpl], label_text), ("names_1tpl", TEMPLATES[:1], lambda c: c)]:
    C = classemb([lab(c) for c in CLASSES], tpls)
    s = e_te @ C.T
    pred = s.argmax(1)
    un = np.isin(y_te, held)
    two = s[un][:, held].argmax(1) == np.array([held.index(y) for y in y_te[un]])
    res[zs_name] = {
        "top1_10": round(float((pred == y_te).mean()), 4),
        "seen_top1": round(float((pred[~un] == y_te[~un]).mean()), 4),
        "unseen_top1_10": round(float((pred[un] == y_te[un]).mean()), 4),
        "heldout_2way": round(float(two.mean()), 4),
        "2way_sandal": round(float(two[y_te[un] == held[0]].mean()), 3),
        "2way_pullover": round(float(two[y_te[un] == held[1]].mean()), 3),
    }
if args.get("probe", "1") == "1":
    from sklearn.linear_model import LogisticRegression

    pick = np.concatenate([rng.choice(np.flatnonzero(trl == c), 300, replace=False) for c in range(10)])
    with torch.no_grad():
        e_p = embed_img(tri[pick])
    pr = LogisticRegression(max_iter=3000, C=10.0).fit(e_p, trl[pick])
    res["probe"] = round(float((pr.predict(e_te[:3000]) == y_te[:3000]).mean()), 4)
    with torch.no_grad():
        f_p = torch.cat([img(prep(tri[pick][i : i + 500])) for i in range(0, len(pick), 500)]).numpy()
        f_te = torch.cat([img(prep(x_te[i : i + 500])) for i in range(0, 3000, 500)]).numpy()
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(f_p)
    pr = LogisticRegression(max_iter=3000, C=10.0).fit(sc.transform(f_p), trl[pick])
    res["probe_pre"] = round(float((pr.predict(sc.transform(f_te)) == y_te[:3000]).mean()), 4)
res["seconds"] = round(time.time() - t0)
print(json.dumps(res), flush=True)
with open(Path(__file__).resolve().parent / "results" / "clip_fashion_ablation.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")

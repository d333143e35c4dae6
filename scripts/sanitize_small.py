"""Small calls of every CUDA op, for compute-sanitizer (memcheck / racecheck) runs from
scripts/device_check.sh. Exits non-zero if an op raises."""
import torch

import pretrain_kernels as pk


def masking():
    g = torch.Generator().manual_seed(0)
    for B, L in [(1, 1), (3, 7), (2, 300), (5, 33)]:
        ids = torch.randint(5, 100, (B, L), generator=g).cuda()
        attn = (torch.rand(B, L, generator=g) < 0.8).cuda()
        ws = (torch.rand(B, L, generator=g) < 0.5).cuda()
        rates = torch.rand(B, generator=g).cuda()
        for kw in [dict(), dict(exact_count=True), dict(word_starts=ws), dict(word_starts=ws, exact_count=True),
                   dict(mask_prob=rates, exact_count=True, max_predictions=2)]:
            pk.mlm_mask(ids, mask_token_id=4, vocab_size=100, special_token_ids=[0, 1, 2, 3, 4], attention_mask=attn,
                        seed=1, **kw)
        pk.span_mask(ids, mask_token_id=4, vocab_size=100, attention_mask=attn, seed=1)
        pk.span_mask(ids, mask_token_id=4, vocab_size=100, word_starts=ws, seed=2)


CHECKS = [masking]

if __name__ == "__main__":
    for check in CHECKS:
        check()
        torch.cuda.synchronize()
        print(f"{check.__name__}: ok")

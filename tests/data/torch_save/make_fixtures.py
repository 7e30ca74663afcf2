"""Writes the torch.save fixtures read by host/src/torch_file.rs's unit tests.

Run with the project's PyTorch venv from this directory:
    /root/.cache/imgclf/torch-2.11.0/venv/bin/python make_fixtures.py
The unit tests assert the exact values set here.
"""
import sys
import types

import torch
import torch.nn as nn

# A stand-in for yacs.config.CfgNode (a dict subclass), pickled under yacs' real name the way
# the reference's checkpoints can hold one.
yacs = types.ModuleType('yacs')
yacs_config = types.ModuleType('yacs.config')


class CfgNode(dict):
    pass


CfgNode.__module__ = 'yacs.config'
yacs_config.CfgNode = CfgNode
sys.modules['yacs'] = yacs
sys.modules['yacs.config'] = yacs_config

torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
# One SGD step first, so the optimizer state holds tensors (its momentum buffers).
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
net(torch.ones(1, 1, 2, 2)).sum().backward()
opt.step()
with torch.no_grad():
    net[0].weight.copy_(torch.tensor([1.0, -2.0]).reshape(2, 1, 1, 1))
    net[0].bias.copy_(torch.tensor([0.5, 0.25]))
    net[1].running_mean.copy_(torch.tensor([0.125, -0.125]))
net[1].num_batches_tracked.fill_(7)
state = net.state_dict()  # OrderedDict with _metadata (BUILD after SETITEMS)
base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
state['base'] = base
state['base_t'] = base.t()  # non-contiguous view of the same storage
state['row'] = base[1]  # storage offset 3
state['scalar'] = torch.tensor(3.25)
state['empty'] = torch.zeros(0, 3)
state['half'] = torch.tensor([0.5, -2.0], dtype=torch.float16)
state['bf16'] = torch.tensor([1.5, -0.25], dtype=torch.bfloat16)
state['f64'] = torch.tensor([0.1], dtype=torch.float64)
state['i32'] = torch.tensor([-7, 9], dtype=torch.int32)
state['u8'] = torch.tensor([0, 255], dtype=torch.uint8)
state['flag'] = torch.tensor([True, False])
state['param'] = nn.Parameter(torch.tensor([2.5]))  # as state_dict(keep_vars=True)

config = CfgNode(model=CfgNode(name='resnet_preact'), train=CfgNode(batch_size=128))
checkpoint = {
    'model': state,
    'optimizer': opt.state_dict(),
    'scheduler': {'last_epoch': 3},
    'epoch': 3,
    'global_step': 12,
    'config': config,
}
torch.save(checkpoint, 'checkpoint.pth')
# The same in the legacy format (the default before PyTorch 1.6, when the reference was written).
torch.save(checkpoint, 'checkpoint_legacy.pth', _use_new_zipfile_serialization=False)

dp = nn.DataParallel(nn.Linear(2, 1))
with torch.no_grad():
    dp.module.weight.copy_(torch.tensor([[1.0, 2.0]]))
    dp.module.bias.copy_(torch.tensor([3.0]))
torch.save(dp.state_dict(), 'data_parallel.pth')

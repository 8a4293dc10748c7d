"""The base model chosen by the tuning sweep in base_sweep (held-out loss 1.5855):
run lr=0.015625,output_mult=8,input_mult=8,init_std=0.02,zero_query=true,zero_readout=true.
Written by `python -m pretrain.study.transfer --choose_base`; do not edit by hand."""

TUNED = {
    'model.init_std': 0.02,
    'optim.lr': 0.015625,
    'parametrization.input_mult': 8.0,
    'parametrization.output_mult': 8.0,
    'parametrization.zero_query': True,
    'parametrization.zero_readout': True,
}

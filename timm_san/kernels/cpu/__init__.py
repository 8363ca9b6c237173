""" CPU kernels of SAN's operators: eval attention, training attention, aggregation, 1x1 convs as matmuls """

""" Neighbour module of ``report_script.py``: importable only when the script's directory is ``sys.path[0]`` """

NEIGHBOUR = 'report_helper'
